"""Run configuration: TOML round trip, flag-style overrides, one-line validation errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from saelab.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    SAEConfig,
    TrainConfig,
    dump_run_config,
    load_run_config,
    run_config_from_dict,
)
from saelab.errors import SaelabError
from saelab.saes.registry import check_run_saes, sae_folder_name

TWO_SAES = """
seed = 3

[model]
name = "tiny"
dtype = "bfloat16"

[data]
context = 64
skip_positions = 2

[train]
tokens = 50_000
lr = 3e-4
grad_clip = 0.0

[[sae]]
hook = "blocks.2.hook_resid_post"
architecture = "topk"
k = 16
width = 512

[[sae]]
hook = "blocks.2.hook_resid_post"
architecture = "relu"
l1_coefficient = 2.5
expansion = 8
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(SaelabError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    return message


def test_toml_is_read_into_typed_sections(tmp_path):
    cfg = load_run_config(_write(tmp_path, TWO_SAES))
    assert cfg.seed == 3
    assert cfg.model == ModelConfig(name="tiny", dtype="bfloat16")
    assert cfg.data == DataConfig(context=64, skip_positions=2)
    assert cfg.train == TrainConfig(tokens=50_000, lr=3e-4, grad_clip=0.0)
    assert [s.architecture for s in cfg.saes] == ["topk", "relu"]
    assert cfg.saes[0].d_sae(64) == 512 and cfg.saes[1].d_sae(64) == 8 * 64
    assert cfg.hooks == ["blocks.2.hook_resid_post"]


@pytest.mark.parametrize("source", ["defaults", "file", "file+overrides"])
def test_dump_then_load_gives_an_equal_config(tmp_path, source):
    path = None if source == "defaults" else _write(tmp_path, TWO_SAES)
    overrides = {"train.lr": "none", "sae.k_aux": "7"} if source == "file+overrides" else None
    cfg = load_run_config(path, overrides)

    text = dump_run_config(cfg)
    again = load_run_config(_write(tmp_path, text, "dumped.toml"))
    assert again == cfg
    assert dump_run_config(again) == text


def test_dump_roundtrips_every_field_set_away_from_its_default(tmp_path):
    """Guards against a field that the dump silently drops: change every one of them."""
    sae = SAEConfig(
        hook="blocks.0.hook_mlp_out",
        architecture="relu",
        expansion=4,
        width=100,
        k=3,
        l1_coefficient=0.5,
        k_aux=9,
        aux_coefficient=0.25,
        dead_window_tokens=1234,
        decoder_init_norm=0.3,
        decoder_unit_norm=True,
        b_dec_init="mean",
        apply_b_dec_to_input=True,
        gated_penalty="april",
        jumprelu_bandwidth=0.002,
        jumprelu_init_threshold=0.003,
        jumprelu_threshold_lr_scale=12.0,
        threshold_ema_lr=0.05,
        matryoshka_widths=(50, 100),
        name="mine",
        layers=(0, 2),
        seed=7,
    )
    # output_hook needs a transcoder architecture, which rules out some fields above.
    transcoder = SAEConfig(architecture="transcoder", output_hook="blocks.0.hook_mlp_out")
    changed = {
        SAEConfig: sae,
        ModelConfig: ModelConfig(name="m", device="cuda:1", dtype="float16"),
        DataConfig: DataConfig(
            "d.txt", 16, 4, 3, 100, 200, activations="acts", activation_epochs=2
        ),
        TrainConfig: dataclasses.replace(
            TrainConfig(10, 5, 1e-3, 0.8, 0.95, 0.1, 0.3, 0.2, 0.5, 7, 3),
            lr_decay="cosine",
            autocast_bf16=True,
            resample_every_steps=50,
            resample_until_frac=0.75,
            resample_dead_window_tokens=300,
            resample_sample_tokens=1000,
            resample_weighting="uniform",
            resample_lr_warmup_steps=20,
            distributed="sae",
        ),
    }
    for cls, obj in changed.items():
        defaults = cls()
        same = [
            f.name
            for f in dataclasses.fields(cls)
            if getattr(obj, f.name) == getattr(defaults, f.name)
        ]
        if cls is SAEConfig and transcoder.output_hook != SAEConfig().output_hook:
            same.remove("output_hook")  # set in the second [[sae]] table
        assert not same, f"{cls.__name__} fields left at default: {same}"
    cfg = RunConfig(
        model=changed[ModelConfig],
        data=changed[DataConfig],
        train=changed[TrainConfig],
        saes=(sae, transcoder),
        seed=11,
    )
    assert load_run_config(_write(tmp_path, dump_run_config(cfg))) == cfg


def test_overrides_apply_to_sections_and_to_every_sae(tmp_path):
    cfg = load_run_config(
        _write(tmp_path, TWO_SAES),
        {
            "train.tokens": "2e5",
            "sae.k": "8",
            "model.device": "cuda",
            "seed": "9",
            "data.context": 32,
        },
    )
    assert cfg.train.tokens == 200_000 and isinstance(cfg.train.tokens, int)
    assert [s.k for s in cfg.saes] == [8, 8]
    assert cfg.model.device == "cuda" and cfg.seed == 9 and cfg.data.context == 32
    # Untouched values come from the file.
    assert cfg.train.lr == 3e-4 and cfg.saes[1].l1_coefficient == 2.5


def test_overrides_without_a_file_start_from_defaults():
    cfg = load_run_config(overrides={"sae.architecture": "relu", "train.lr": "1e-3"})
    assert cfg.saes[0].architecture == "relu" and cfg.train.lr == 1e-3
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()


def test_override_none_resets_an_optional_field(tmp_path):
    cfg = load_run_config(_write(tmp_path, TWO_SAES), {"train.lr": "none", "sae.width": "None"})
    assert cfg.train.lr is None
    assert all(s.width is None for s in cfg.saes)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"train.tokens": "lots"}, "train.tokens"),
        ({"train.tokens": "2.5e0"}, "train.tokens"),
        ({"train.lr": "fast"}, "train.lr"),
    ],
)
def test_non_numeric_override_is_an_error(overrides, expected):
    assert expected in _error(load_run_config, overrides=overrides)


def test_unknown_field_lists_valid_fields(tmp_path):
    message = _error(load_run_config, _write(tmp_path, "[train]\ntokenz = 5\n"))
    assert "tokenz" in message
    assert all(f.name in message for f in dataclasses.fields(TrainConfig))

    message = _error(load_run_config, overrides={"sae.kk": "3"})
    assert "kk" in message and all(f.name in message for f in dataclasses.fields(SAEConfig))


def test_unknown_section_lists_valid_sections(tmp_path):
    message = _error(load_run_config, _write(tmp_path, "[optim]\nlr = 1\n"))
    assert "optim" in message
    assert all(s in message for s in ("model", "data", "train", "sae"))
    message = _error(load_run_config, overrides={"optim.lr": "1"})
    assert "optim.lr" in message and "train" in message
    assert "tokens" in _error(load_run_config, overrides={"tokens": "1"})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"train.tokens": "-5"}, "train.tokens"),
        ({"train.batch_size": "0"}, "train.batch_size"),
        ({"train.lr": "-1e-3"}, "train.lr"),
        ({"train.lr_warmup_frac": "1.5"}, "train.lr_warmup_frac"),
        ({"train.grad_clip": "-1"}, "train.grad_clip"),
        ({"model.device": "tpu"}, "model.device"),
        ({"model.dtype": "float8"}, "model.dtype"),
        ({"data.context": "1"}, "data.context"),
        ({"data.skip_positions": "128"}, "data.skip_positions"),
        ({"sae.k": "0"}, "sae.k"),
        ({"sae.expansion": "0"}, "sae.expansion"),
        ({"sae.l1_coefficient": "-1"}, "sae.l1_coefficient"),
    ],
)
def test_validation_errors_name_the_field(overrides, field):
    assert field in _error(load_run_config, overrides=overrides)


def test_device_accepts_indexed_cuda():
    assert load_run_config(overrides={"model.device": "cuda:1"}).model.device == "cuda:1"


def test_duplicate_sae_folders_are_an_error_until_named(tmp_path):
    table = '[[sae]]\nhook = "blocks.1.hook_resid_post"\nk = 4\n'
    # The run checks folder names when it starts (the config layer knows no architectures).
    message = _error(
        lambda path: check_run_saes(load_run_config(path).saes), _write(tmp_path, table * 2)
    )
    assert sae_folder_name(SAEConfig(hook="blocks.1.hook_resid_post", k=4)) in message
    assert "name" in message
    named = table + 'name = "a"\n' + table + 'name = "b"\n'
    saes = load_run_config(_write(tmp_path, named)).saes
    check_run_saes(saes)
    assert [sae_folder_name(s) for s in saes] == ["a", "b"]


def test_folder_names_differ_by_setting():
    a, b, c = SAEConfig(k=4), SAEConfig(k=8), SAEConfig(architecture="relu")
    assert len({sae_folder_name(a), sae_folder_name(b), sae_folder_name(c)}) == 3


def test_no_sae_is_an_error():
    assert "[[sae]]" in _error(run_config_from_dict, {"sae": []})


def test_single_sae_table_is_accepted(tmp_path):
    cfg = load_run_config(_write(tmp_path, "[sae]\nk = 5\n"), {"sae.expansion": "2"})
    assert len(cfg.saes) == 1 and cfg.saes[0].k == 5 and cfg.saes[0].expansion == 2


def test_bad_toml_and_missing_file_are_one_line_errors(tmp_path):
    assert "TOML" in _error(load_run_config, _write(tmp_path, "[train]\ntokens 5\n"))
    assert "does not exist" in _error(load_run_config, tmp_path / "nope.toml")


def test_configs_are_frozen():
    cfg = load_run_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.tokens = 5  # type: ignore[misc]


def test_derived_values_are_properties():
    train = TrainConfig(tokens=10_001, batch_size=1000)
    assert train.steps == 11
    sae = SAEConfig(expansion=4, k_aux=None)
    assert sae.d_sae(10) == 40 and sae.k_aux_for(10) == 5
    assert SAEConfig(width=7, k_aux=3).d_sae(10) == 7 and SAEConfig(k_aux=3).k_aux_for(10) == 3
