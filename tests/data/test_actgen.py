"""The activation stream, made faster and given a refill bar, serves exactly what it served before.

A reference implementation of the stream as first written (hooked forward, kept rows, one scale
from the first fill, out-of-place scaling, fresh rows joined before the kept ones and shuffled by
one seeded generator) is the oracle: batches equal it bit for bit, with the bar on or off, and
a resume from any point goes on bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from saelab.data.activations import ActivationStream, special_token_ids
from saelab.data.scale import activation_scale, norm_sum
from saelab.data.text import TokenBatches
from saelab.models.intervene import run_to_hooks
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]  # two widths: 64 and 96
BATCH, BUFFER, N_BATCHES = 32, 256, 20  # a refill every 4 batches: 5 fills


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def text(tokenizer, words_file) -> TokenBatches:
    return TokenBatches(str(words_file), tokenizer, context=16, batch_size=8, seed=0)


def make_stream(model, tokenizer, words_file, **kwargs) -> ActivationStream:
    options = {"batch_size": BATCH, "buffer_size": BUFFER, "seed": 3} | kwargs
    return ActivationStream(model, text(tokenizer, words_file), HOOKS, **options)


def reference_batches(model, tokenizer, words_file, n_batches: int) -> list[dict]:
    """The stream as first written, re-derived from its definition."""
    batches = iter(text(tokenizer, words_file))
    specials = torch.tensor(special_token_ids(tokenizer))
    generator = torch.Generator().manual_seed(3)
    size, per_fill = BUFFER, BUFFER // 2
    pending = {h: None for h in HOOKS}

    def fresh(n: int) -> dict:
        chunks = {h: [pending[h]] if pending[h] is not None else [] for h in HOOKS}
        have = chunks[HOOKS[0]][0].shape[0] if chunks[HOOKS[0]] else 0
        while have < n:
            tokens_NP = next(batches)
            keep_NP = ~torch.isin(tokens_NP, specials)
            keep_NP[:, 0] = False
            acts = run_to_hooks(model, tokens_NP, HOOKS)
            for h in HOOKS:
                chunks[h].append(acts[h][keep_NP].float())
            have += int(keep_NP.sum())
        out = {}
        for h in HOOKS:
            joined = torch.cat(chunks[h])
            out[h], pending[h] = joined[:n], joined[n:]
        return out

    held, served, scales, out = None, 0, {}, []
    while len(out) < n_batches:
        if held is None or served >= per_fill:
            rows = fresh(size if held is None else served)
            if held is None:
                for h in HOOKS:
                    scales[h] = activation_scale(
                        norm_sum(rows[h]), rows[h].shape[0], rows[h].shape[-1], h
                    )
            rows = {h: rows[h] * scales[h] for h in HOOKS}
            if held is not None:
                rows = {h: torch.cat([rows[h], held[h][served:]]) for h in HOOKS}
            perm = torch.randperm(rows[HOOKS[0]].shape[0], generator=generator)
            held, served = {h: rows[h][perm] for h in HOOKS}, 0
        out.append({h: held[h][served : served + BATCH].clone() for h in HOOKS})
        served += BATCH
    return out


def draw(stream, n: int) -> list[dict]:
    batches = iter(stream)
    return [{h: b.clone() for h, b in next(batches).items()} for _ in range(n)]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        for h in HOOKS:
            assert torch.equal(a[h], b[h]), (i, h)


@pytest.mark.parametrize("progress", [False, True])
def test_batches_equal_the_reference_bit_for_bit(model, tokenizer, words_file, progress, capsys):
    stream = make_stream(model, tokenizer, words_file, progress=progress)
    assert_same(draw(stream, N_BATCHES), reference_batches(model, tokenizer, words_file, N_BATCHES))
    err = capsys.readouterr().err
    if progress:  # the first fill and each refill show a bar of rows (tqdm writes to stderr)
        assert "activations" in err and "refill" in err and "row" in err
    else:
        assert "refill" not in err


@pytest.mark.parametrize("stop_after", [1, 4, 6])  # just before a refill, just after one, between
def test_a_resume_goes_on_bit_for_bit(model, tokenizer, words_file, stop_after):
    whole = draw(make_stream(model, tokenizer, words_file), 10)
    first = make_stream(model, tokenizer, words_file)
    head = draw(first, stop_after)
    state = first.state_dict()
    second = make_stream(model, tokenizer, words_file)
    second.load_state_dict(state)
    assert_same(head + draw(second, 10 - stop_after), whole)
