"""The architecture registry: folder names stay what old runs have on disk, run checks fire."""

from __future__ import annotations

import pytest

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.saes import ARCHITECTURES
from saelab.saes.registry import check_run_saes, sae_folder_name

HOOK, OUT = "blocks.6.hook_resid_post", "blocks.6.hook_mlp_out"
DEFAULT = {}
SET = {"width": 4096, "k": 8, "l1_coefficient": 0.25}
APRIL = {"gated_penalty": "april", "l1_coefficient": 2.0}

# Computed with the folder-name rule as it stood in saelab.config (SAEConfig.folder_name) before
# it moved to the architectures: run folders written then must keep their names.
OLD_NAMES = {
    ("batchtopk", "default"): "blocks.6.hook_resid_post-batchtopk-x16-k32",
    ("batchtopk", "set"): "blocks.6.hook_resid_post-batchtopk-w4096-k8",
    ("batchtopk", "april"): "blocks.6.hook_resid_post-batchtopk-x16-k32",
    ("gated", "default"): "blocks.6.hook_resid_post-gated-x16-l1_5",
    ("gated", "set"): "blocks.6.hook_resid_post-gated-w4096-l1_0.25",
    ("gated", "april"): "blocks.6.hook_resid_post-gated-x16-l1_2-april",
    ("jumprelu", "default"): "blocks.6.hook_resid_post-jumprelu-x16-l0_5",
    ("jumprelu", "set"): "blocks.6.hook_resid_post-jumprelu-w4096-l0_0.25",
    ("jumprelu", "april"): "blocks.6.hook_resid_post-jumprelu-x16-l0_2",
    # Cross-layer transcoders (new with replacement sets): named by the same rule.
    ("jumprelu_clt_transcoder", "default"): (
        "blocks.6.hook_resid_post-jumprelu_clt_transcoder-x16-l0_5"
    ),
    ("jumprelu_clt_transcoder", "set"): (
        "blocks.6.hook_resid_post-jumprelu_clt_transcoder-w4096-l0_0.25"
    ),
    ("jumprelu_clt_transcoder", "april"): (
        "blocks.6.hook_resid_post-jumprelu_clt_transcoder-x16-l0_2"
    ),
    ("topk_clt_transcoder", "default"): "blocks.6.hook_resid_post-topk_clt_transcoder-x16-k32",
    ("topk_clt_transcoder", "set"): "blocks.6.hook_resid_post-topk_clt_transcoder-w4096-k8",
    ("topk_clt_transcoder", "april"): "blocks.6.hook_resid_post-topk_clt_transcoder-x16-k32",
    ("matryoshka", "default"): "blocks.6.hook_resid_post-matryoshka-x16-k32",
    ("matryoshka", "set"): "blocks.6.hook_resid_post-matryoshka-w4096-k8",
    ("matryoshka", "april"): "blocks.6.hook_resid_post-matryoshka-x16-k32",
    ("relu", "default"): "blocks.6.hook_resid_post-relu-x16-l1_5",
    ("relu", "set"): "blocks.6.hook_resid_post-relu-w4096-l1_0.25",
    ("relu", "april"): "blocks.6.hook_resid_post-relu-x16-l1_2",
    ("skip_transcoder", "default"): "blocks.6.hook_resid_post-skip_transcoder-x16-l1_5",
    ("skip_transcoder", "set"): "blocks.6.hook_resid_post-skip_transcoder-w4096-l1_0.25",
    ("skip_transcoder", "april"): "blocks.6.hook_resid_post-skip_transcoder-x16-l1_2",
    ("topk", "default"): "blocks.6.hook_resid_post-topk-x16-k32",
    ("topk", "set"): "blocks.6.hook_resid_post-topk-w4096-k8",
    ("topk", "april"): "blocks.6.hook_resid_post-topk-x16-k32",
    ("topk_skip_transcoder", "default"): "blocks.6.hook_resid_post-topk_skip_transcoder-x16-k32",
    ("topk_skip_transcoder", "set"): "blocks.6.hook_resid_post-topk_skip_transcoder-w4096-k8",
    ("topk_skip_transcoder", "april"): "blocks.6.hook_resid_post-topk_skip_transcoder-x16-k32",
    ("topk_transcoder", "default"): "blocks.6.hook_resid_post-topk_transcoder-x16-k32",
    ("topk_transcoder", "set"): "blocks.6.hook_resid_post-topk_transcoder-w4096-k8",
    ("topk_transcoder", "april"): "blocks.6.hook_resid_post-topk_transcoder-x16-k32",
    ("transcoder", "default"): "blocks.6.hook_resid_post-transcoder-x16-l1_5",
    ("transcoder", "set"): "blocks.6.hook_resid_post-transcoder-w4096-l1_0.25",
    ("transcoder", "april"): "blocks.6.hook_resid_post-transcoder-x16-l1_2",
}
SETTINGS = {"default": DEFAULT, "set": SET, "april": APRIL}


def _cfg(architecture: str, **fields) -> SAEConfig:
    out = OUT if ARCHITECTURES[architecture].is_transcoder else None
    return SAEConfig(hook=HOOK, architecture=architecture, output_hook=out, **fields)


def test_every_architecture_is_pinned():
    assert {arch for arch, _ in OLD_NAMES} == set(ARCHITECTURES)


@pytest.mark.parametrize(("architecture", "setting"), sorted(OLD_NAMES))
def test_folder_names_are_byte_identical_to_the_old_rule(architecture, setting):
    cfg = _cfg(architecture, **SETTINGS[setting])
    assert sae_folder_name(cfg) == OLD_NAMES[architecture, setting]
    assert sae_folder_name(_cfg(architecture, name="mine", **SETTINGS[setting])) == "mine"


def test_run_checks_name_unknown_architectures_and_shared_folders():
    with pytest.raises(SaelabError, match="unknown SAE architecture 'nope'; choose one of"):
        check_run_saes([SAEConfig(architecture="nope")])
    with pytest.raises(SaelabError, match="share the folder blocks.6.hook_resid_post-topk-x16-k32"):
        check_run_saes([SAEConfig(), SAEConfig()])
    check_run_saes([SAEConfig(), SAEConfig(k=16)])
