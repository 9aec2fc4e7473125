"""The evaluation suite: extra metrics against closed forms, shared forward passes for many SAEs
(same numbers as one at a time, fewer passes), and the sanity warnings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.config import SAEConfig
from saelab.evaluation.evaluate import EXTRA_KEYS, METRIC_KEYS, evaluate_sae, evaluate_saes
from saelab.evaluation.sanity import (
    CE_EXCESS_NATS,
    expected_input_norm,
    reference_ce,
    sanity_warnings,
)
from saelab.saes import TopKSAE
from saelab.saes.metrics import ReconstructionStats, frequency_metrics, max_decoder_cos
from saelab.saes.storage import read_sae_cfg, save_sae
from tiny_models import D_MODEL, build_tiny_model, build_tiny_tokenizer

HOOK_A = "blocks.0.hook_resid_post"
HOOK_B = "blocks.1.hook_resid_post"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Reference CEs are cached under a test-local saelab cache."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))


# ----- metric oracles ---------------------------------------------------------------------------


def naive_max_decoder_cos(W_FD: torch.Tensor) -> float:
    best = 0.0
    for i in range(W_FD.shape[0]):
        for j in range(W_FD.shape[0]):
            if i != j:
                cos = torch.nn.functional.cosine_similarity(W_FD[i], W_FD[j], dim=0)
                best = max(best, abs(float(cos)))
    return best


def test_max_decoder_cos_of_hand_set_rows():
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    assert max_decoder_cos(rows) == pytest.approx(0.0, abs=1e-7)  # orthogonal
    rows[2] = torch.tensor([1.0, 1.0, 0.0])
    assert max_decoder_cos(rows) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    rows[2] = torch.tensor([-5.0, 0.0, 0.0])  # anti-parallel counts: |cos| = 1
    assert max_decoder_cos(rows) == pytest.approx(1.0, rel=1e-6)
    assert max_decoder_cos(rows[:1]) == 0.0


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_max_decoder_cos_in_chunks_matches_the_naive_loop(chunk):
    W_FD = torch.randn(23, 5, generator=torch.Generator().manual_seed(0))
    assert max_decoder_cos(W_FD, chunk=chunk) == pytest.approx(naive_max_decoder_cos(W_FD), 1e-5)


def test_frequency_thresholds_are_strict():
    density = torch.tensor([0.0, 0.005, 0.01, 0.02, 0.1, 0.5], dtype=torch.float64)
    freq = frequency_metrics(density)
    assert freq["freq_over_1_percent"] == pytest.approx(3 / 6)  # 0.02, 0.1, 0.5
    assert freq["freq_over_10_percent"] == pytest.approx(1 / 6)  # 0.5


def test_cos_sim_and_l2_ratio_closed_forms():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    stats = ReconstructionStats(4, 3)
    stats.update(x, 2 * x, torch.zeros(10), torch.zeros(3, dtype=torch.int64))
    m = stats.compute()
    assert m["cos_sim"] == pytest.approx(1.0) and m["l2_ratio"] == pytest.approx(2.0)
    ortho = torch.stack([x[:, 1], -x[:, 0], x[:, 3], -x[:, 2]], dim=1)  # x·ortho = 0 per row
    stats.reset()
    stats.update(x, 0.5 * ortho, torch.zeros(10), torch.zeros(3, dtype=torch.int64))
    m = stats.compute()
    assert m["cos_sim"] == pytest.approx(0.0, abs=1e-7) and m["l2_ratio"] == pytest.approx(0.5)


# ----- many SAEs, shared passes -----------------------------------------------------------------


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def count_block_rows(model) -> list[int]:
    """Sequences through decoder blocks, summed over the blocks: the cost of the passes."""
    calls = [0]
    for block in model.model.layers:
        block.register_forward_pre_hook(
            lambda _, args: calls.__setitem__(0, calls[0] + args[0].shape[0])
        )
    return calls


EVAL = {"tokens": 2 * 4 * 32, "context": 32, "batch_size": 4, "progress": False}


def test_many_saes_match_one_at_a_time_with_fewer_forward_passes(words_file):
    model = build_tiny_model("llama")
    tokenizer = build_tiny_tokenizer()
    saes = [
        TopKSAE(SAEConfig(hook=HOOK_A, k=4, expansion=2), d_in=D_MODEL, seed=0),
        TopKSAE(SAEConfig(hook=HOOK_A, k=8, expansion=2), d_in=D_MODEL, seed=1),
        TopKSAE(SAEConfig(hook=HOOK_B, k=4, expansion=2), d_in=D_MODEL, seed=2),
    ]
    calls = count_block_rows(model)
    kwargs = {**EVAL, "dataset": str(words_file), "check_reference": False}
    together = evaluate_saes(saes, model, tokenizer, **kwargs)
    shared_calls, calls[0] = calls[0], 0
    alone = [evaluate_sae(sae, model, tokenizer, **kwargs) for sae in saes]
    n_batches, n = 2, EVAL["batch_size"]
    # Per batch, in sequences × blocks of the 3-block model: the clean pass (3 blocks), then
    # from block 1 on (after HOOK_A) 2 spliced + 1 ablated, from block 2 on 1 + 1 ...
    assert shared_calls == n_batches * n * (3 + (2 + 1) * 2 + (1 + 1) * 1)
    # ... against a clean pass and two variants for each SAE alone.
    assert calls[0] == n_batches * n * ((3 + 2 * 2) * 2 + (3 + 2 * 1))
    for (m_all, info_all), (m_one, info_one) in zip(together, alone, strict=True):
        assert tuple(m_all) == METRIC_KEYS
        for key in METRIC_KEYS:
            assert m_all[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key
        for key in EXTRA_KEYS:
            assert info_all[key] == pytest.approx(info_one[key], rel=1e-5, abs=1e-7), key
        assert info_all["dead_window_tokens"] == info_all["tokens"]
    # The two SAEs of one hook share clean and ablated losses but not their spliced ones.
    assert together[0][0]["ce_loss_ablated"] == together[1][0]["ce_loss_ablated"]
    assert together[0][0]["ce_loss_ablated"] != together[2][0]["ce_loss_ablated"]
    assert together[0][0]["ce_loss_spliced"] != together[1][0]["ce_loss_spliced"]


# ----- sanity report ----------------------------------------------------------------------------


def test_norm_warning_fires_for_a_mis_scaled_sae_and_not_for_a_correct_one(words_file):
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    sae = TopKSAE(SAEConfig(hook=HOOK_A, k=4, expansion=2), d_in=D_MODEL, seed=0)
    kwargs = {**EVAL, "dataset": str(words_file)}
    _, info = evaluate_sae(sae, model, tokenizer, **kwargs)
    mean_norm = info["mean_input_norm"]
    sae.activation_scale.fill_(math.sqrt(D_MODEL) / mean_norm)  # as training would set it
    _, good = evaluate_sae(sae, model, tokenizer, **kwargs)
    assert good["warnings"] == [] and good["position0_masked"]
    assert good["expected_input_norm"] == pytest.approx(mean_norm, rel=1e-5)
    assert good["reference_ce"] is not None
    sae.activation_scale.fill_(math.sqrt(D_MODEL) / (5 * mean_norm))  # trained on 5× the norm
    _, bad = evaluate_sae(sae, model, tokenizer, **kwargs)
    assert len(bad["warnings"]) == 1 and "mean norm" in bad["warnings"][0]


def test_expected_norm_of_a_saved_sae_comes_from_its_folded_scale(tmp_path):
    sae = TopKSAE(SAEConfig(hook=HOOK_A, k=4, expansion=2), d_in=D_MODEL, seed=0)
    sae.activation_scale.fill_(0.25)
    save_sae(sae, tmp_path / "sae")
    cfg = read_sae_cfg(tmp_path / "sae")
    assert expected_input_norm(sae, cfg) == pytest.approx(math.sqrt(D_MODEL) / 0.25)
    sae.activation_scale.fill_(1.0)  # never estimated: nothing to compare with
    assert expected_input_norm(sae) is None


def test_unmasked_bos_is_reported(words_file, monkeypatch):
    import saelab.evaluation.splice as splice_module  # where eval masks its batches

    model = build_tiny_model("llama")
    sae = TopKSAE(SAEConfig(hook=HOOK_A, k=4, expansion=2), d_in=D_MODEL, seed=0)
    # A tokenizer that declares no special tokens and no skipped positions: the BOS at
    # position 0 is scored.
    monkeypatch.setattr(splice_module, "special_token_ids", lambda tokenizer: [])
    _, info = evaluate_sae(
        sae,
        model,
        build_tiny_tokenizer(),
        dataset=str(words_file),
        skip_positions=0,
        check_reference=False,
        **EVAL,
    )
    assert not info["position0_masked"]
    assert any("position 0" in w for w in info["warnings"])


def test_clean_ce_warning_threshold_and_reference_cache(caplog):
    ref = 3.0
    common = {"ref_ce": ref, "context": 32, "position0_kept": False}
    assert (
        sanity_warnings(
            clean_ce=ref + CE_EXCESS_NATS - 0.1, **common, mean_norm=None, expected_norm=None
        )
        == []
    )
    with caplog.at_level("WARNING"):
        warned = sanity_warnings(
            clean_ce=ref + CE_EXCESS_NATS + 0.1, **common, mean_norm=None, expected_norm=None
        )
    assert len(warned) == 1 and "clean CE" in warned[0] and "clean CE" in caplog.text

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    first = reference_ce(model, tokenizer, "tiny", context=16, tokens=64)
    calls = count_forwards(model)
    assert reference_ce(model, tokenizer, "tiny", context=16, tokens=64) == first
    assert calls[0] == 0  # read from the cache
    assert 0 < first < 2 * math.log(256)


def test_saved_saes_load_each_model_once_and_share_a_summary(words_file, tmp_path, monkeypatch):
    import saelab.evaluation.evaluate as evaluate_module

    loads = []

    def fake_load_model(name, device="cpu"):
        loads.append(name)
        return build_tiny_model("llama"), build_tiny_tokenizer()

    monkeypatch.setattr(evaluate_module, "load_model", fake_load_model)
    for i, context in enumerate((32, 32, 16)):  # two settings of one model
        meta = {"model_name": "tiny", "dataset_path": str(words_file), "context_size": context}
        sae = TopKSAE(SAEConfig(hook=HOOK_A, k=4, expansion=2), d_in=D_MODEL, seed=i)
        save_sae(sae, tmp_path / "run" / f"sae{i}", metadata=meta)
    (tmp_path / "run" / "notes.txt").write_text("not an SAE")
    summary = evaluate_module.evaluate_sae_dirs(
        [str(tmp_path / "run" / "*")], tokens=128, progress=False
    )
    assert loads == ["tiny"]
    assert [e["context"] for e in summary["saes"]] == [32, 32, 16]
    written = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert written == {k: v for k, v in summary.items() if k != "path"}
    for entry in written["saes"]:
        assert set(entry["metrics"]) == {*METRIC_KEYS, *EXTRA_KEYS}
