"""Pickle-free checkpoints: nested state → safetensors + JSON skeleton → the same state, exactly.

The oracle for "exactly" is behavioural: an Adam optimiser restored from a checkpoint takes the
same next steps, bit for bit, as the one that was saved.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from saelab.errors import SaelabError
from saelab.training.checkpoint import (
    flatten_state,
    latest_checkpoint,
    load_state,
    save_state,
    unflatten_state,
    write_checkpoint,
)


def assert_same_structure(got, want, path: str = "state") -> None:
    """Deep equality that also checks container and key types (tuple ≠ list, 0 ≠ "0")."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got, want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for key in want:
            assert all(type(a) is type(b) for a, b in zip(got, want, strict=True)), path
            assert_same_structure(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_structure(a, b, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, path


def _model_and_adam(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-7)
    return model, opt


def _step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_adam_state_roundtrip_continues_bit_identically(tmp_path):
    model, opt = _model_and_adam()
    for s in range(3):
        _step(model, opt, s)

    save_state(tmp_path, "optimizer", opt.state_dict())
    restored_state = load_state(tmp_path, "optimizer")
    assert_same_structure(restored_state, opt.state_dict())
    assert set(restored_state["state"]) == {0, 1, 2, 3}  # int parameter ids, not "0"
    assert isinstance(restored_state["param_groups"][0]["betas"], tuple)

    # A fresh optimiser on a copy of the parameters, given the restored state...
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5)  # hyper-parameters come from the state
    opt2.load_state_dict(restored_state)
    # ...takes the same next steps as the original.
    for s in range(3, 6):
        _step(model, opt, s)
        _step(model2, opt2, s)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_structure(opt2.state_dict(), opt.state_dict())


def test_restored_adam_without_the_state_would_diverge(tmp_path):
    """Sanity for the test above: a fresh Adam (no moments) does not take the same step."""
    model, opt = _model_and_adam()
    for s in range(3):
        _step(model, opt, s)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-7)
    _step(model, opt, 3)
    _step(model2, opt2, 3)
    pairs = zip(model.parameters(), model2.parameters(), strict=True)
    assert not all(torch.equal(p, q) for p, q in pairs)


NESTED = {
    "ints": {0: "zero", 1: (1, 2.5, None), -3: [True, False]},
    "tuple_of_dicts": ({"a": torch.arange(3)}, {"b": torch.zeros(0, 4)}),
    "tuple_keys": {(1, "x"): 1.0, 2.5: "float key", True: "bool key", None: "none key"},
    "tensors": [torch.randn(2, 3), torch.tensor(7, dtype=torch.int64), torch.ones(2).bfloat16()],
    "rng": torch.get_rng_state(),
    "specials": [float("inf"), -0.0, 1e300, "", "__tensor__", {"__dict__": "user key"}],
    "empty": [{}, [], ()],
    "deep": [[[[{"x": ((torch.tensor([1.5]),),)}]]]],
}


def test_nested_structures_roundtrip_through_files(tmp_path):
    tensors, skeleton = flatten_state(NESTED)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    json.dumps(skeleton)  # the skeleton is pure JSON
    assert_same_structure(unflatten_state(tensors, skeleton), NESTED)

    save_state(tmp_path, "nested", NESTED)
    assert_same_structure(load_state(tmp_path, "nested"), NESTED)


def test_non_finite_floats_roundtrip(tmp_path):
    state = {"nan": float("nan"), "inf": float("-inf")}
    save_state(tmp_path, "s", state)
    assert_same_structure(load_state(tmp_path, "s"), state)


def test_tensor_views_are_saved_as_their_own_values(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"row": base[1], "col": base[:, 2], "t": base.T, "param": torch.nn.Parameter(base)}
    save_state(tmp_path, "views", state)
    loaded = load_state(tmp_path, "views")
    assert_same_structure(loaded, {k: v.detach().contiguous() for k, v in state.items()})


def test_rng_state_restores_the_random_stream(tmp_path):
    torch.manual_seed(5)
    save_state(tmp_path, "rng", {"rng": torch.get_rng_state()})
    expected = torch.rand(4)
    torch.manual_seed(99)
    torch.set_rng_state(load_state(tmp_path, "rng")["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_unsupported_objects_are_refused_with_their_location():
    with pytest.raises(TypeError, match=r"set at s\.0\.1$"):
        flatten_state({"a": [1, {2}]})


def test_load_state_errors_are_one_line(tmp_path):
    with pytest.raises(SaelabError) as err:
        load_state(tmp_path, "missing")
    assert "\n" not in str(err.value) and "missing.json" in str(err.value)

    save_state(tmp_path, "s", {"t": torch.randn(100)})
    path = tmp_path / "s.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SaelabError) as err:
        load_state(tmp_path, "s")
    assert "\n" not in str(err.value)


def test_write_checkpoint_points_latest_at_a_complete_folder_and_prunes(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        final = write_checkpoint(tmp_path, step, {"a": {"step": step, "t": torch.full((2,), step)}})
        assert latest_checkpoint(tmp_path) == final
        assert load_state(final, "a")["step"] == step
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "latest.json",
        "step_00000020",
        "step_00000030",
    ]
    assert torch.equal(load_state(latest_checkpoint(tmp_path), "a")["t"], torch.full((2,), 30))
