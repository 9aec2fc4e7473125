"""Hostile and damaged files: every one is a one-line SaelabError that names the file, raised
from saelab's own header check before safetensors (or torch) allocates anything.

The oracle for "before any large allocation" is that the checked readers never reach
``safe_open`` for a refused header (it is replaced by one that fails the test), and a header whose
claims would need terabytes is refused with the file a few hundred bytes long.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import saelab.safetensors_check as check_module
from saelab.analysis.features.stats import META_FILENAME, STATS_FILENAME, FeatureStats
from saelab.analysis.steering.vectors import (
    VECTOR_FILENAME,
    SteeringVector,
    load_vector,
    save_vector,
)
from saelab.config import SAEConfig
from saelab.data.cache.index import INDEX_FILENAME, CacheIndex, CacheShard, file_sha256
from saelab.data.cache.reader import ActivationCacheStream
from saelab.errors import SaelabError
from saelab.saes import TopKSAE
from saelab.saes.formats import read_sae, write_sae
from saelab.saes.storage import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae
from saelab.safetensors_check import (
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    check_finite,
    check_safetensors,
    read_tensors,
)

D_IN, D_SAE = 8, 16
FIX = "re-save it"


def raw_file(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    """A safetensors-shaped file: 8-byte little-endian length, the header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message.strip() and "\n" not in message
    return message


def forbid_safe_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on the checked reader must refuse files on its own, without safetensors."""

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open reached for a file the header check should refuse")

    monkeypatch.setattr(check_module, "safe_open", refuse)


@pytest.fixture
def no_safe_open(monkeypatch):
    forbid_safe_open(monkeypatch)


HOSTILE: dict[str, tuple[dict | bytes, bytes, int | None, str]] = {
    # name: (header, data, header length written (None: the true one), words in the message)
    "huge-header-length": ({}, b"", 2**62, "more than the"),
    "header-past-the-file": ({}, b"", 4096, "the file has only"),
    "header-not-json": (b"\x00\xffnot json at all", b"", None, "not JSON"),
    "header-a-list": (b"[1, 2, 3]", b"", None, "not an object"),
    "tensor-not-an-object": ({"W": [1, 2]}, b"", None, "not an object"),
    "unknown-dtype": ({"W": entry("F128", [2], 0, 32)}, bytes(32), None, "unknown dtype"),
    "shape-not-ints": ({"W": entry("F32", [2.5], 0, 10)}, bytes(10), None, "non-negative"),
    "negative-dim": ({"W": entry("F32", [-1, 4], 0, 16)}, bytes(16), None, "non-negative"),
    "bool-dim": ({"W": entry("F32", [True], 0, 4)}, bytes(4), None, "non-negative"),
    "negative-offset": ({"W": entry("F32", [1], -4, 0)}, bytes(4), None, "data_offsets"),
    "offsets-reversed": ({"W": entry("F32", [1], 4, 0)}, bytes(4), None, "end before"),
    "offset-past-the-file": ({"W": entry("F32", [1], 0, 4000)}, bytes(4), None, "outside"),
    "absurd-shape": (
        {"W": entry("F32", [2**40, 2**40, 2**40], 0, 16)},
        bytes(16),
        None,
        "claims shape",
    ),
    "shape-not-the-span": ({"W": entry("F32", [1], 0, 8)}, bytes(8), None, "span"),
    "overlapping": (
        {"A": entry("F32", [4], 0, 16), "B": entry("F32", [4], 8, 24)},
        bytes(24),
        None,
        "overlaps",
    ),
    "gap": (
        {"A": entry("F32", [4], 0, 16), "B": entry("F32", [4], 20, 36)},
        bytes(36),
        None,
        "gap",
    ),
    "trailing-bytes": ({"A": entry("F32", [4], 0, 16)}, bytes(20), None, "cover 16 bytes"),
    "metadata-not-strings": (
        {"__metadata__": {"a": 1}, "A": entry("F32", [1], 0, 4)},
        bytes(4),
        None,
        "__metadata__",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_are_one_line_errors_before_safetensors_reads(tmp_path, case, no_safe_open):
    header, data, length, words = HOSTILE[case]
    path = raw_file(tmp_path / "w.safetensors", header, data, length)
    with pytest.raises(SaelabError) as exc:
        read_tensors(path, fix=FIX)
    message = one_line(exc)
    assert str(path) in message and words in message and message.endswith(FIX)


def test_the_same_files_are_refused_by_safetensors_too(tmp_path):
    """The check refuses only what the format forbids: safetensors itself rejects each file."""
    for case, (header, data, length, _) in HOSTILE.items():
        path = raw_file(tmp_path / f"{case}.safetensors", header, data, length)
        # safetensors raises its own error types
        with pytest.raises(Exception), safe_open(str(path), framework="pt") as handle:  # noqa: B017
            for name in handle.keys():  # noqa: SIM118
                handle.get_tensor(name)


def test_a_too_short_file_and_an_empty_one(tmp_path, no_safe_open):
    for content in (b"", b"\x01\x02"):
        path = tmp_path / "short.safetensors"
        path.write_bytes(content)
        with pytest.raises(SaelabError, match="too few") as exc:
            read_tensors(path, fix=FIX)
        one_line(exc)


def test_the_header_limit_is_safetensors_own(tmp_path):
    # Just over the limit is refused even when the file really is that long: no 100 MB parse.
    path = raw_file(tmp_path / "big.safetensors", b"{}", length=MAX_HEADER_BYTES + 1)
    with pytest.raises(SaelabError, match="more than the"):
        check_safetensors(path, fix=FIX)


def test_a_dtype_the_consumer_cannot_use_is_named(tmp_path, no_safe_open):
    path = raw_file(tmp_path / "w.safetensors", {"W": entry("I32", [2], 0, 8)}, bytes(8))
    with pytest.raises(SaelabError) as exc:
        read_tensors(path, fix=FIX, dtypes=FLOAT_DTYPES)
    assert "'W'" in one_line(exc) and "I32" in one_line(exc) and "F32" in one_line(exc)


def test_sound_files_pass_and_the_header_agrees_with_safetensors(tmp_path):
    """Oracle: safetensors' own reading of files it wrote (odd shapes, zero-size, several
    dtypes, metadata) agrees with the parsed header, and the tensors read back equal."""
    tensors = {
        "z": torch.zeros(0, 3),
        "a": torch.randn(3, 5),
        "h": torch.randn(7).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "s": torch.tensor(1.5),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"note": "x"})
    entries = check_safetensors(path, fix=FIX)
    with safe_open(str(path), framework="pt") as handle:
        for name in tensors:
            piece = handle.get_slice(name)
            assert entries[name].shape == tuple(piece.get_shape())
            assert entries[name].dtype == piece.get_dtype()
    back = read_tensors(path, fix=FIX)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[n], tensors[n]) for n in tensors)


def test_header_order_need_not_be_offset_order(tmp_path):
    data = struct.pack("<4f", 1, 2, 3, 4)
    header = {"B": entry("F32", [2], 8, 16), "A": entry("F32", [2], 0, 8)}
    back = read_tensors(raw_file(tmp_path / "w.safetensors", header, data), fix=FIX)
    assert back["A"].tolist() == [1, 2] and back["B"].tolist() == [3, 4]


def test_check_finite_names_the_tensor():
    check_finite({"ok": torch.ones(3), "ids": torch.arange(3)}, "f", fix=FIX)
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):
        with pytest.raises(SaelabError) as exc:
            check_finite({"ok": torch.ones(2), "W_dec": torch.tensor([1.0, bad])}, "f", fix=FIX)
        assert "'W_dec'" in one_line(exc) and word in one_line(exc)


# ----- every reader of user safetensors uses the check --------------------------------------


def _sae() -> TopKSAE:
    sae = TopKSAE(SAEConfig(k=2, width=D_SAE, hook="blocks.0.hook_resid_post"), D_IN)
    with torch.no_grad():
        sae.b_dec.add_(0.1)
    return sae


OVERLAPPING = {"W_enc": entry("F32", [4], 0, 16), "W_dec": entry("F32", [4], 8, 24)}


def _hostile(path: Path) -> Path:
    return raw_file(path, OVERLAPPING, bytes(24))


def _sae_folder(tmp_path: Path) -> Path:
    return save_sae(_sae(), tmp_path / "sae")


def _sparsify_folder(tmp_path: Path) -> Path:
    write_sae(_sae(), tmp_path / "sparsify", "sparsify")
    return tmp_path / "sparsify"


def _dl_folder(tmp_path: Path) -> Path:
    write_sae(_sae(), tmp_path / "dl", "dictionary_learning")
    return tmp_path / "dl"


READERS = {
    "saelab-folder": (_sae_folder, WEIGHTS_FILENAME, load_sae),
    "sparsify": (_sparsify_folder, "sae.safetensors", lambda p: read_sae(p).sae),
    "dictionary_learning": (_dl_folder, "ae.safetensors", lambda p: read_sae(p).sae),
}


@pytest.mark.parametrize("layout", READERS)
def test_sae_readers_load_sound_files_and_refuse_hostile_ones(tmp_path, layout, monkeypatch):
    make, weights, read = READERS[layout]
    folder = make(tmp_path)
    torch.testing.assert_close(read(folder).b_dec, _sae().b_dec)
    forbid_safe_open(monkeypatch)
    _hostile(folder / weights)
    with pytest.raises(SaelabError) as exc:
        read(folder)
    assert str(folder / weights) in one_line(exc) and "overlaps" in one_line(exc)


@pytest.mark.parametrize("layout", READERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_sae_readers_refuse_non_finite_weights(tmp_path, layout, bad):
    make, weights, read = READERS[layout]
    folder = make(tmp_path)
    with safe_open(str(folder / weights), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata()
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.ndim == 2)
    tensors[name] = tensors[name].clone()
    tensors[name][1, 1] = bad
    save_file(tensors, str(folder / weights), metadata=metadata)
    with pytest.raises(SaelabError) as exc:
        read(folder)
    assert f"'{name}'" in one_line(exc) and str(folder / weights) in one_line(exc)


def test_sae_weights_of_an_integer_dtype_are_refused(tmp_path):
    folder = _sae_folder(tmp_path)
    with safe_open(str(folder / WEIGHTS_FILENAME), framework="pt") as handle:
        tensors = {n: handle.get_tensor(n) for n in handle.keys()}  # noqa: SIM118
    tensors["W_enc"] = tensors["W_enc"].to(torch.int32)
    save_file(tensors, str(folder / WEIGHTS_FILENAME))
    with pytest.raises(SaelabError) as exc:
        load_sae(folder)
    assert "'W_enc'" in one_line(exc) and "I32" in one_line(exc)


def test_steering_vectors_refuse_hostile_and_non_finite_files(tmp_path, no_safe_open):
    folder = save_vector(
        SteeringVector(torch.ones(D_IN), "blocks.0.hook_resid_post", "mean", "m"), tmp_path / "v"
    )
    _hostile(folder / VECTOR_FILENAME)
    with pytest.raises(SaelabError) as exc:
        load_vector(folder)
    assert str(folder / VECTOR_FILENAME) in one_line(exc) and "overlaps" in one_line(exc)


def test_steering_vectors_refuse_nan(tmp_path):
    vector = torch.ones(D_IN)
    vector[3] = float("nan")
    folder = save_vector(
        SteeringVector(vector, "blocks.0.hook_resid_post", "mean", "m"), tmp_path / "v"
    )
    with pytest.raises(SaelabError) as exc:
        load_vector(folder)
    assert "'vector'" in one_line(exc) and "NaN" in one_line(exc)


def test_feature_statistics_refuse_hostile_files(tmp_path, no_safe_open):
    (tmp_path / META_FILENAME).write_text(json.dumps({"n_tokens": 1, "window": 1}))
    _hostile(tmp_path / STATS_FILENAME)
    with pytest.raises(SaelabError) as exc:
        FeatureStats.load(tmp_path)
    assert str(tmp_path / STATS_FILENAME) in one_line(exc) and "saelab features" in one_line(exc)


def test_activation_cache_refuses_a_hostile_shard(tmp_path):
    """A shard whose header lies (matching the index's size, so only the header check can tell)."""
    hook = "blocks.0.hook_resid_post"
    shard = tmp_path / "shard_00000.safetensors"
    raw_file(shard, {hook: entry("F32", [2**31, 2**31], 0, 64)}, bytes(64))
    index = CacheIndex(
        model="m",
        hooks=(hook,),
        d_in={hook: 4},
        dtype="float32",
        scales={hook: 1.0},
        count=4,
        shards=(CacheShard(shard.name, 4, shard.stat().st_size, file_sha256(shard)),),
        context=8,
        dataset="d",
        seed=0,
        skip_positions=0,
        norm_estimate_tokens=4,
        saelab_version="0",
    )
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index.to_json()))
    with pytest.raises(SaelabError) as exc:
        ActivationCacheStream(tmp_path, batch_size=2)
    assert str(shard) in one_line(exc) and "claims shape" in one_line(exc)
    assert "saelab cache" in one_line(exc)
    # The same shard, honest: the stream is made and serves its rows.
    save_file({hook: torch.arange(16.0).reshape(4, 4)}, str(shard))
    index = CacheIndex(
        **{
            **index.__dict__,
            "shards": (CacheShard(shard.name, 4, shard.stat().st_size, file_sha256(shard)),),
        }
    )
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index.to_json()))
    batch = next(iter(ActivationCacheStream(tmp_path, batch_size=4, buffer_size=4)))
    assert sorted(batch[hook][:, 0].tolist()) == [0.0, 4.0, 8.0, 12.0]


# ----- cfg.json fields of the wrong type ------------------------------------------------------


def _with_cfg(tmp_path: Path, change) -> Path:
    folder = _sae_folder(tmp_path)
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    change(cfg)
    (folder / CFG_FILENAME).write_text(json.dumps(cfg))
    return folder


def _set(*keys, value):
    def change(cfg):
        target = cfg
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def _saelens_only(*keys, value):
    """A SAELens-written cfg.json (no saelab section) with one field changed."""

    def change(cfg):
        del cfg["saelab"]
        _set(*keys, value=value)(cfg)

    return change


BAD_CFG = {
    "d_sae-a-string": (_set("d_sae", value="big"), "d_sae"),
    "d_in-negative": (_set("d_in", value=-3), "d_in"),
    "d_in-a-bool": (_set("d_in", value=True), "d_in"),
    "d_in-a-float": (_set("d_in", value=8.0), "d_in"),
    "k-a-fraction": (_set("k", value=3.5), "k"),
    "k-zero": (_saelens_only("k", value=0), "k"),
    "architecture-a-list": (_set("architecture", value=["topk"]), "architecture"),
    "architecture-unknown": (_saelens_only("architecture", value="quantum"), "quantum"),
    "saelab-architecture-unknown": (_set("saelab", "architecture", value="quantum"), "quantum"),
    "saelab-architecture-a-number": (_set("saelab", "architecture", value=3), "architecture"),
    "hook-a-list": (_set("metadata", "hook_name", value=["a", "b"]), "hook_name"),
    "metadata-a-string": (_set("metadata", value="x"), "metadata"),
    "apply_b_dec-a-string": (_set("apply_b_dec_to_input", value="yes"), "apply_b_dec_to_input"),
    "saelab-sae-a-list": (_set("saelab", "sae", value=[1]), "saelab.sae"),
    "saelab-k-a-string": (_set("saelab", "sae", "k", value="big"), "saelab.sae.k"),
    "saelab-k-a-fraction": (_set("saelab", "sae", "k", value=3.5), "saelab.sae.k"),
    "saelab-k-negative": (_set("saelab", "sae", "k", value=-3), "sae.k"),
    "saelab-hook-a-list": (_set("saelab", "sae", "hook", value=["x"]), "saelab.sae.hook"),
    "saelab-widths-strings": (
        _set("saelab", "sae", "matryoshka_widths", value=["a"]),
        "matryoshka_widths",
    ),
    "cfg-without-widths": (lambda cfg: cfg.clear() or cfg.update({"x": 1}), "d_in"),
    "normalize-a-number": (_saelens_only("normalize_activations", value=3), "normalize"),
}


@pytest.mark.parametrize("case", BAD_CFG)
def test_cfg_fields_of_the_wrong_type_are_named(tmp_path, case):
    change, field = BAD_CFG[case]
    folder = _with_cfg(tmp_path, change)
    with pytest.raises(SaelabError) as exc:
        load_sae(folder)
    message = one_line(exc)
    assert field in message and str(folder / CFG_FILENAME) in message


def test_a_cfg_that_is_not_an_object(tmp_path):
    folder = _sae_folder(tmp_path)
    (folder / CFG_FILENAME).write_text("[1, 2]")
    with pytest.raises(SaelabError, match="not an object") as exc:
        load_sae(folder)
    one_line(exc)


def test_saelens_cfg_without_saelab_section_still_loads(tmp_path):
    """The checks refuse wrong types only: SAELens' own cfg.json (nulls included) loads."""
    folder = _with_cfg(tmp_path, _saelens_only("metadata", "hook_name_out", value=None))
    assert load_sae(folder).cfg.k == 2
