"""The vector folder: save → load is bit-identical, sae-clamp vectors bring their SAE, and bad
folders, unknown hooks and other widths give one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from steering_fixtures import HOOK, tiny_sae

from saelab.analysis.steering.vectors import (
    META_FILENAME,
    VECTOR_FILENAME,
    SteeringVector,
    check_fits,
    load_vector,
    save_vector,
)
from saelab.errors import SaelabError, UnknownHookError
from saelab.saes.storage import save_sae
from tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_load_round_trip_is_bit_identical(tmp_path) -> None:
    vector = SteeringVector(torch.randn(3, 64), HOOK, "actadd", "tiny", {"positive": "w5"})
    save_vector(vector, tmp_path / "v")
    loaded = load_vector(tmp_path / "v")
    assert torch.equal(loaded.vector, vector.vector)
    assert (loaded.hook, loaded.method, loaded.model, loaded.source) == (
        HOOK,
        "actadd",
        "tiny",
        {"positive": "w5"},
    )
    meta = json.loads((tmp_path / "v" / META_FILENAME).read_text())
    assert meta["d_model"] == 64 and meta["layer"] == 1 and meta["shape"] == [3, 64]
    assert meta["norm"] == pytest.approx(float(vector.vector.double().norm()))
    assert not list((tmp_path / "v").glob("*.tmp"))


def test_clamp_vector_loads_its_sae(tmp_path) -> None:
    sae = tiny_sae()
    save_sae(sae, tmp_path / "sae")
    source = {"sae": str(tmp_path / "sae"), "feature": 4, "unit_scale": 2.0}
    vector = SteeringVector(sae.W_dec[4].detach(), HOOK, "sae-clamp", "tiny", source, sae)
    save_vector(vector, tmp_path / "v")
    loaded = load_vector(tmp_path / "v")
    assert torch.equal(loaded.sae.W_dec, sae.W_dec) and loaded.source["feature"] == 4
    with pytest.raises(SaelabError, match="records no SAE folder"):
        save_vector(SteeringVector(torch.zeros(64), HOOK, "sae-clamp", "tiny", {}, sae), tmp_path)


def test_bad_folders_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(SaelabError, match="not a saved steering vector"):
        load_vector(tmp_path)
    save_vector(SteeringVector(torch.zeros(64), HOOK, "mean", "tiny"), tmp_path / "v")
    (tmp_path / "v" / VECTOR_FILENAME).write_bytes(b"not safetensors")
    with pytest.raises(SaelabError, match="corrupt or truncated") as error:
        load_vector(tmp_path / "v")
    assert "\n" not in str(error.value)


@pytest.mark.integration
def test_width_and_hook_mismatches_are_one_line_errors() -> None:
    model = build_tiny_model("gpt2")
    with pytest.raises(SaelabError, match="d_model=32") as error:
        check_fits(model, SteeringVector(torch.zeros(32), HOOK, "mean", "other"))
    assert "\n" not in str(error.value) and "width 64" in str(error.value)
    with pytest.raises(UnknownHookError, match="blocks.9.hook_resid_post") as error:
        check_fits(model, SteeringVector(torch.zeros(64), "blocks.9.hook_resid_post", "mean", "x"))
    assert "\n" not in str(error.value)
