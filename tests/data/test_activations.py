"""ActivationStream on a tiny random Llama: masking, scaling, shared shuffling, exact resume."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.data.activations import ActivationStream, model_activations, token_mask
from saelab.data.text import TokenBatches
from saelab.models.intervene import run_to_hooks
from tiny_models import VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.integration

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_stream(model, tokenizer, words_file, hooks=(HOOK,), **kwargs):
    tokens = TokenBatches(str(words_file), tokenizer, context=16, batch_size=8, seed=0)
    options = {"batch_size": 32, "buffer_size": 256, "seed": 0} | kwargs
    return ActivationStream(model, tokens, list(hooks), **options)


def test_token_mask_drops_first_positions_and_special_tokens():
    tokens = torch.tensor([[1, 5, 2, 7], [1, 6, 8, 2]])
    keep = token_mask(tokens, skip_positions=1, special_ids=[1, 2])
    assert keep.tolist() == [[False, True, False, True], [False, True, True, False]]


def test_batches_have_the_right_shape_and_mean_norm(model, tokenizer, words_file):
    # Estimate the scale on the whole first fill, so its mean norm is exactly √d.
    stream = make_stream(model, tokenizer, words_file, norm_estimate_tokens=10**6)
    batches = iter(stream)
    first = next(batches)[HOOK]
    assert first.shape == (32, 64)
    buffer = stream.buffer.rows[HOOK]
    assert buffer.norm(dim=-1).mean().item() == pytest.approx(math.sqrt(64), rel=1e-5)
    assert stream.scales[HOOK] > 0


def test_data_parallel_scale_comes_from_the_norm_sums_of_every_process(
    model, tokenizer, words_file
):
    """``sum_over_ranks`` adds the other processes' [Σ‖x‖, rows] per hook: here a fake second
    process with 100 rows of norm 10; the scale is √d over the mean norm of all rows."""
    received = []

    def plus_one(sums_H2):
        received.append(sums_H2.clone())
        return sums_H2 + torch.tensor([[1000.0, 100.0]], dtype=torch.float64)

    stream = make_stream(
        model, tokenizer, words_file, norm_estimate_tokens=10**6, sum_over_ranks=plus_one
    )
    next(iter(stream))
    raw_norms = (stream.buffer.rows[HOOK].double() / stream.scales[HOOK]).norm(dim=-1)
    assert received[0].tolist() == [[pytest.approx(raw_norms.sum().item()), 256]]
    mean_norm = (raw_norms.sum().item() + 1000.0) / (256 + 100)
    assert stream.scales[HOOK] == pytest.approx(math.sqrt(64) / mean_norm, rel=1e-6)


def test_rows_are_the_kept_positions_of_the_model(model, tokenizer, words_file):
    stream = make_stream(model, tokenizer, words_file)
    next(iter(stream))
    served = stream.buffer.rows[HOOK] / stream.scales[HOOK]
    # Oracle: the same token batches, activations taken directly, BOS position dropped.
    tokens = TokenBatches(str(words_file), tokenizer, context=16, batch_size=8, seed=0)
    rows = []
    while sum(r.shape[0] for r in rows) < served.shape[0]:
        tokens_NP = next(tokens)
        keep = token_mask(tokens_NP, 1, [1, 2])
        assert not keep[:, 0].any()
        rows.append(run_to_hooks(model, tokens_NP, [HOOK])[HOOK][keep])
    expected = torch.cat(rows)[: served.shape[0]]
    # The buffer is shuffled: compare as sets of rows, ordered by a row statistic.
    order_served = served.sum(-1).argsort()
    order_expected = expected.sum(-1).argsort()
    torch.testing.assert_close(served[order_served], expected[order_expected], rtol=1e-4, atol=1e-4)


def test_model_activations_flatten_kept_positions(model):
    """Row t is the t-th kept (sequence, position) in row-major order, with the value the model
    computes there: a hand-made mask against HF's own hidden states, picked one by one."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB_SIZE, (3, 7), generator=generator)
    keep = torch.rand(3, 7, generator=generator) > 0.4
    keep[:, 0] = False  # any pattern works; one row keeps nothing at its start, one keeps all
    keep[1] = True
    hooks = [HOOK, "blocks.0.hook_resid_post"]
    acts = model_activations(model, tokens, hooks, keep)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for hook, layer in zip(hooks, (1, 0), strict=True):
        expected = torch.stack(
            [hidden[layer + 1][n, p] for n in range(3) for p in range(7) if keep[n, p]]
        )
        assert acts[hook].dtype == torch.float32
        assert acts[hook].shape == (int(keep.sum()), 64)
        torch.testing.assert_close(acts[hook], expected, rtol=1e-5, atol=1e-5)


def test_several_hooks_share_one_shuffle(model, tokenizer, words_file):
    # resid_pre of block 2 is resid_post of block 1: identical rows prove one permutation.
    stream = make_stream(
        model,
        tokenizer,
        words_file,
        hooks=(HOOK, "blocks.2.hook_resid_pre", "blocks.0.hook_mlp_out"),
    )
    for _, batch in zip(range(12), stream, strict=False):
        torch.testing.assert_close(batch[HOOK], batch["blocks.2.hook_resid_pre"])
        assert batch["blocks.0.hook_mlp_out"].shape == (32, 64)


def test_state_dict_resumes_the_exact_same_batches(model, tokenizer, words_file):
    stream = make_stream(model, tokenizer, words_file)
    batches = iter(stream)
    for _ in range(7):  # past the first refill (4 batches per half buffer)
        next(batches)
    state = stream.state_dict()
    expected = [next(batches)[HOOK] for _ in range(9)]

    resumed = make_stream(model, tokenizer, words_file)
    resumed.load_state_dict(state)
    got = [b[HOOK] for _, b in zip(range(9), resumed, strict=False)]
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("batch_size", "buffer_size"), [(32, 10), (32, 64), (32, 65), (32, 100), (7, 50), (16, 200)]
)
def test_buffer_is_at_least_two_batches(model, tokenizer, words_file, batch_size, buffer_size):
    """The buffer holds max(buffer_size, 2 batches) rows; between refills it serves whole
    batches, at least one and at most half of what it holds."""
    stream = make_stream(
        model, tokenizer, words_file, batch_size=batch_size, buffer_size=buffer_size
    )
    size = stream.buffer.size
    assert size == max(buffer_size, 2 * batch_size)
    served_per_fill, fills, held = [], None, []
    for _, batch in zip(range(3 * size // batch_size + 2), stream, strict=False):
        assert batch[HOOK].shape == (batch_size, 64)
        held.append(stream.buffer.held)
        if stream.buffer.rows is not fills:  # a refill just happened
            fills = stream.buffer.rows
            served_per_fill.append(0)
        served_per_fill[-1] += batch_size
    assert max(held) == size
    assert len(served_per_fill) >= 3
    for served in served_per_fill[:-1]:  # the last fill may not be finished
        assert batch_size <= served <= size // 2
        assert served % batch_size == 0
