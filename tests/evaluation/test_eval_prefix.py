"""``saelab eval`` at forward-pass cost stays equal to the plain three full passes.

The clean pass runs every block once; each variant (an SAE spliced in, or the zeros) runs only
from the block its hook's change first reaches, several stacked in one batch; the LM head, CE and
KL are computed in chunks of positions. Against :func:`~saelab.evaluation.splice.splice_batch`
(three full passes with whole logits, per SAE) on every model family, with the block calls
counted.
"""

from __future__ import annotations

import pytest
import torch

from saelab.config import SAEConfig
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.evaluation import splice
from saelab.evaluation.evaluate import evaluate_saes
from saelab.evaluation.splice import SpliceSums, splice_batch
from saelab.models.hookpoints import decoder_blocks, hook_dim, residual_entry
from saelab.models.intervene import capture, final_logits, patch, run_blocks_from
from saelab.saes import TopKSAE, TopKTranscoder
from tiny_models import FAMILIES, N_LAYERS, VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT, BATCH, N_BATCHES = 24, 3, 2
EVAL = {
    "tokens": N_BATCHES * BATCH * CONTEXT,
    "context": CONTEXT,
    "batch_size": BATCH,
    "progress": False,
    "check_reference": False,
}
SPLICE_KEYS = ("ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "kl", "kl_ablated")


def saes_for(model) -> list:
    """SAEs at every kind of entry point of the 3-block model: the residual itself (after block
    1: variants start at block 2; after the last block: only the final norm; before block 0: a
    full pass), inside a block (the MLP hidden layer of block 1) and a transcoder inside block 2
    (MLP input → MLP output); two SAEs share a hook, so their variants are stacked."""

    def topk(hook: str, k: int, seed: int) -> TopKSAE:
        return TopKSAE(SAEConfig(hook=hook, k=k, expansion=2), hook_dim(model, hook), seed=seed)

    tc_in, tc_out = "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"
    transcoder = TopKTranscoder(
        SAEConfig(architecture="topk_transcoder", hook=tc_in, output_hook=tc_out, k=4),
        hook_dim(model, tc_in),
        d_out=hook_dim(model, tc_out),
        seed=5,
    )
    return [
        topk("blocks.1.hook_resid_post", 4, 0),
        topk("blocks.1.hook_resid_post", 8, 1),
        topk("blocks.2.hook_resid_post", 4, 2),
        topk("blocks.1.mlp.hook_post", 4, 3),
        transcoder,
        topk("blocks.0.hook_resid_pre", 4, 4),
    ]


def plain_reference(model, tokenizer, saes, dataset: str) -> list[dict[str, float]]:
    """Each SAE alone, three full forward passes a batch, on the batches ``eval`` reads."""
    batches = TokenBatches(dataset, tokenizer, context=CONTEXT, batch_size=BATCH, seed=1)
    sums = [SpliceSums() for _ in saes]
    specials = special_token_ids(tokenizer)
    for _ in range(N_BATCHES):
        tokens_NP = next(batches)
        keep_NP = token_mask(tokens_NP, 1, specials)
        for sae, total in zip(saes, sums, strict=True):
            out = sae.cfg.output_hook
            hook, input_hook = (sae.cfg.hook, None) if out is None else (out, sae.cfg.hook)
            with torch.no_grad():
                splice_batch(model, hook, tokens_NP, keep_NP, sae, total, input_hook=input_hook)
    return [total.compute() for total in sums]


def count_block_rows(model) -> list[int]:
    """Sequences each block has run on (a skipped block is swapped out, so it counts nothing)."""
    rows = [0] * N_LAYERS
    for i, block in enumerate(decoder_blocks(model)):

        def count(_, args, kwargs, i=i):
            rows[i] += (args[0] if args else kwargs["hidden_states"]).shape[0]

        block.register_forward_pre_hook(count, with_kwargs=True)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_equals_three_full_passes_and_runs_each_block_as_counted(
    family, words_file, monkeypatch
):
    model, tokenizer = build_tiny_model(family), build_tiny_tokenizer()
    saes = saes_for(model)
    # Small chunks and passes, so that positions span several logit chunks and one hook's
    # three variants (two SAEs and the zeros) take two stacked passes.
    monkeypatch.setattr(splice, "LOGIT_CHUNK_ELEMENTS", 7 * VOCAB_SIZE)
    monkeypatch.setattr(splice, "SUFFIX_TOKENS_PER_PASS", 2 * BATCH * CONTEXT)
    rows = count_block_rows(model)
    fast = evaluate_saes(saes, model, tokenizer, dataset=str(words_file), **EVAL)
    # Per batch, in sequences: the clean pass runs every block; the resid_pre-0 SAE (spliced +
    # zeros) is a full pass; block 1's MLP SAE runs from block 1; both resid_post-1 SAEs and the
    # transcoder from block 2; the last block's resid_post SAE only the final norm.
    assert rows == [N_BATCHES * BATCH * n for n in (1 + 2, 1 + 2 + 2, 1 + 2 + 2 + 3 + 2)]
    reference = plain_reference(model, tokenizer, saes, str(words_file))
    for (metrics, info), plain in zip(fast, reference, strict=True):
        for key in SPLICE_KEYS:
            value = metrics[key] if key in metrics else info[key]
            assert value == pytest.approx(plain[key], rel=1e-5, abs=1e-6), (info["hook"], key)
    # The SAEs change the loss (the comparison is not between two clean passes).
    assert all(m["kl"] > 1e-3 for m, _ in fast)


def test_the_blocks_before_the_earliest_hook_run_once_per_batch(words_file):
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    saes = [s for s in saes_for(model) if s.cfg.hook == "blocks.1.hook_resid_post"]
    rows = count_block_rows(model)
    evaluate_saes(saes, model, tokenizer, dataset=str(words_file), **EVAL)
    # 1 prefix (blocks 0 and 1) + (1 clean + 2 SAEs + 1 hook's zeros) suffixes (block 2).
    assert rows == [N_BATCHES * BATCH * n for n in (1, 1, 1 + 2 + 1)]


def test_models_without_a_table_take_full_passes_with_the_same_numbers(words_file, monkeypatch):
    model, tokenizer = build_tiny_model("gemma2"), build_tiny_tokenizer()
    saes = saes_for(model)[:2]
    fast = evaluate_saes(saes, model, tokenizer, dataset=str(words_file), **EVAL)
    monkeypatch.setattr(splice, "skips_blocks", lambda model: False)
    rows = count_block_rows(model)
    full = evaluate_saes(saes, model, tokenizer, dataset=str(words_file), **EVAL)
    assert rows == [N_BATCHES * BATCH * (1 + 2 + 1)] * N_LAYERS  # every pass is whole
    for (m_fast, _), (m_full, _) in zip(fast, full, strict=True):
        for key in SPLICE_KEYS[:4]:
            assert m_fast[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-6), key


def tokens(n: int = 2, p: int = 20) -> torch.Tensor:
    out = torch.randint(3, VOCAB_SIZE, (n, p), generator=torch.Generator().manual_seed(0))
    out[:, 0] = 1
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_running_from_any_block_with_its_clean_residual_gives_the_full_logits(family):
    # Context 20 > Gemma 2's sliding window of 4: the skipped blocks keep their attention types.
    model, ids = build_tiny_model(family), tokens()
    full = model(ids, use_cache=False).logits
    names = [
        f"blocks.{layer}.hook_resid_{side}" for layer in range(N_LAYERS) for side in ("pre", "post")
    ]
    with capture(model, names, stop=False) as acts:
        model(ids, use_cache=False)
    for name in names:
        start, direct = residual_entry(model, name)
        assert direct
        hidden = run_blocks_from(model, ids, start, acts[name]) if start else None
        if hidden is not None:
            assert torch.allclose(final_logits(model, hidden), full, atol=1e-5), name
    # A patch inside the first block that runs applies as in a full patched pass.
    shift = {"blocks.1.mlp.hook_post": lambda x: x + 1}
    with patch(model, shift):
        patched = model(ids, use_cache=False).logits
    hidden = run_blocks_from(model, ids, 1, acts["blocks.0.hook_resid_post"], patches=shift)
    assert torch.allclose(final_logits(model, hidden), patched, atol=1e-5)
    assert not torch.allclose(patched, full, atol=1e-3)
    # The blocks are back in place afterwards.
    assert all(type(b).__name__ != "_Skipped" for b in decoder_blocks(model))
