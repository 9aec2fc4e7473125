"""Feature statistics against a brute-force dense computation on a tiny model: top examples
(values, sequence/position, window activations), density/mean/max, histograms, quantile samples,
logit effects against a naive W_U @ (gain * d); save/load; memory shape for 16k features."""

from __future__ import annotations

import re

import pytest
import torch
from feature_fixtures import CONTEXT, HOOK, tiny_feature_stats, tiny_sae

from saelab.analysis.dashboard import feature_fragment, write_dashboard
from saelab.analysis.features import (
    HIST_BINS,
    META_FILENAME,
    QUANTILE_BUCKETS,
    STATS_FILENAME,
    FeatureStats,
    logit_effects_of,
)
from saelab.analysis.features.running import _RunningStats
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.models.intervene import run_to_hooks
from tiny_models import build_tiny_model, build_tiny_tokenizer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

BATCH = 4
WINDOW = (4, 2)


@pytest.fixture(scope="module")
def run(words_file):
    """(stats, dense activations [S, P, F] computed naively, scored mask [S, P], sae, model)."""
    torch.manual_seed(0)
    sae, model = tiny_sae(), build_tiny_model("llama")
    stats = tiny_feature_stats(words_file, sae=sae, model=model, batch_size=BATCH, window=WINDOW)
    tokens_SP = stats.tokens.long()
    keep_SP = token_mask(tokens_SP, 1, special_token_ids(build_tiny_tokenizer()))
    dense_SPF = torch.zeros(*tokens_SP.shape, sae.d_sae)
    with torch.no_grad():
        for start in range(0, len(tokens_SP), BATCH):
            rows = slice(start, start + BATCH)
            x_NPD = run_to_hooks(model, tokens_SP[rows], [HOOK])[HOOK]
            dense_SPF[rows][keep_SP[rows]] = sae.encode(x_NPD[keep_SP[rows]])
    return stats, dense_SPF, keep_SP, sae, model


def test_stored_tokens_are_the_runs_sequences(run, words_file):
    stats, _, keep_SP, _, _ = run
    batches = TokenBatches(str(words_file), build_tiny_tokenizer(), context=CONTEXT, batch_size=4)
    expected = torch.cat([next(batches) for _ in range(len(stats.tokens) // 4)])
    assert torch.equal(stats.tokens.long(), expected)
    assert stats.n_tokens == int(keep_SP.sum())
    assert (stats.tokens == build_tiny_tokenizer().eos_token_id).any()  # specials mid-sequence


def test_density_mean_and_max_equal_brute_force(run):
    stats, dense_SPF, keep_SP, _, _ = run
    acts_TF = dense_SPF[keep_SP]
    fired_F = (acts_TF > 0).sum(0)
    assert torch.equal(stats.fired, fired_F)
    torch.testing.assert_close(stats.density, fired_F.double() / len(acts_TF))
    mean_F = acts_TF.double().sum(0) / fired_F.clamp_min(1)
    torch.testing.assert_close(stats.mean_act, mean_F, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.max_act, acts_TF.amax(0), rtol=1e-5, atol=1e-7)
    assert stats.summary()["frac_dead"] == pytest.approx(float((fired_F == 0).double().mean()))


def window_of(dense_SPF, tokens_SP, f, seq, pos):
    before, after = WINDOW
    start, stop = max(0, pos - before), min(tokens_SP.shape[1], pos + after + 1)
    return dense_SPF[seq, start:stop, f], tokens_SP[seq, start:stop], pos - start


def test_top_examples_equal_sorted_dense_activations(run):
    stats, dense_SPF, _, _, _ = run
    K = stats.meta["top_k"]
    checked = 0
    for f in range(stats.n_features):
        acts_SP = dense_SPF[:, :, f]
        where = (acts_SP > 0).nonzero()
        values = acts_SP[acts_SP > 0]
        order = values.argsort(descending=True, stable=True)[:K]  # ties: earliest first
        examples = stats.top_examples(f)
        assert len(examples) == len(order)
        for rank, e in zip(order.tolist(), examples, strict=True):
            seq, pos = where[rank].tolist()
            assert (e.sequence, e.position) == (seq, pos)
            assert e.value == pytest.approx(float(values[rank]), rel=1e-5)
            acts_W, ids_W, max_index = window_of(dense_SPF, stats.tokens, f, seq, pos)
            assert e.max_index == max_index and e.acts[max_index] == e.value
            assert e.acts == pytest.approx(acts_W.tolist(), rel=1e-5, abs=1e-7)
            assert e.tokens == [stats.vocab[t] for t in ids_W.tolist()]
            checked += 1
        assert stats.top_examples(f, 2) == examples[:2]
    assert checked > stats.n_features  # most features fire several times


def test_special_tokens_and_position_zero_are_never_examples(run):
    stats, *_ = run
    specials = set(special_token_ids(build_tiny_tokenizer()))
    for f in range(stats.n_features):
        found = stats.top_examples(f) + [e for _, ex in stats.quantile_examples(f) for e in ex]
        for e in found:
            assert e.position > 0
            assert int(stats.tokens[e.sequence, e.position]) not in specials
            assert e.value > 0


def test_histograms_count_every_firing_in_its_bin(run):
    stats, dense_SPF, keep_SP, _, _ = run
    for f in range(stats.n_features):
        edges, counts = stats.histogram(f)
        acts = dense_SPF[keep_SP][:, f]
        acts = acts[acts > 0]
        assert sum(counts) == len(acts) == int(stats.fired[f])
        if not len(acts):
            assert (edges, counts) == ([0.0], [])
            continue
        width = edges[1] - edges[0]
        assert len(edges) == len(counts) + 1 and HIST_BINS // 2 <= len(counts) <= HIST_BINS
        assert edges[-2] <= float(acts.max()) < edges[-1]
        naive = torch.bincount((acts / width).floor().long(), minlength=len(counts))
        assert naive.tolist() == counts


def test_quantile_examples_are_distinct_firings_from_their_interval(run):
    stats, dense_SPF, keep_SP, _, _ = run
    n = stats.meta["n_quantile_examples"]
    for f in range(stats.n_features):
        groups = stats.quantile_examples(f)
        if not int(stats.fired[f]):
            assert groups == []
            continue
        top = float(stats.max_act[f])
        all_acts = dense_SPF[keep_SP][:, f]
        shares = 0.0
        for label, examples in groups:
            lo, hi, share = re.fullmatch(r"(\S+)–(\S+) of max \((\S+)%\)", label).groups()
            lo, hi = float(lo) * top, float(hi) * top
            shares += float(share) / 100
            in_interval = int(
                ((all_acts >= lo - 0.005 * top) & (all_acts <= hi + 0.005 * top)).sum()
            )
            assert 1 <= len(examples) <= min(n, in_interval)
            assert len({(e.sequence, e.position) for e in examples}) == len(examples)
            assert [e.value for e in examples] == sorted((e.value for e in examples), reverse=True)
            for e in examples:
                assert e.value == pytest.approx(float(dense_SPF[e.sequence, e.position, f]))
                assert lo - 0.005 * top <= e.value <= hi + 0.005 * top
                acts_W, _, max_index = window_of(dense_SPF, stats.tokens, f, e.sequence, e.position)
                assert e.max_index == max_index
                assert e.acts == pytest.approx(acts_W.tolist(), rel=1e-5, abs=1e-7)
        assert shares == pytest.approx(1.0, abs=0.002 * len(groups))


def test_reservoirs_stay_uniform_across_envelope_doublings():
    """One feature, two batches: batch 2 doubles the envelope, merging the intervals
    [0.75, 0.875) and [0.875, 1) of batch 1 into [0.75, 1) where batch 2 adds more firings.
    Every one of the m firings there must be kept with probability n/m."""
    batch1 = torch.cat([torch.linspace(0.76, 0.87, 6), torch.linspace(0.88, 0.99, 10)])
    batch2 = torch.cat([torch.linspace(0.77, 0.98, 8), torch.tensor([1.5])])
    picks, n, seeds = torch.zeros(2, 16), 3, 400
    for seed in range(seeds):
        stats = _RunningStats(1, top_k=1, n_quantile=n, window=(0, 0), device="cpu", seed=seed)
        for b, acts in enumerate((batch1, batch2)):
            stats.update_(acts.view(1, -1, 1), len(acts), first_seq=b)
        assert int(stats.exp_F[0]) == 1  # envelope 2: interval 3 is [0.75, 1)
        q = stats.quantiles
        kept = q.seq[3][q.key[3] >= 0], q.pos[3][q.key[3] >= 0]
        assert len(kept[0]) == n
        for seq, pos in zip(*kept, strict=True):
            picks[seq, pos] += 1
    expected = seeds * n / 24
    assert picks[0].sum() + picks[1, :8].sum() == seeds * n and picks[1, 8] == 0
    in_bucket = torch.cat([picks[0], picks[1, :8]])
    assert ((in_bucket - expected).abs() < 4 * expected**0.5).all()  # each ~ Binomial(400, 1/8)
    assert picks[0].sum() / (seeds * n) == pytest.approx(16 / 24, abs=0.05)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_logit_effects_equal_the_naive_product(family):
    model = build_tiny_model(family)
    dirs_FD = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    got = logit_effects_of(dirs_FD, model, n=7)
    W_VD = model.get_output_embeddings().weight.detach()
    if family == "gpt2":  # LayerNorm: centre, then scale
        norm = model.transformer.ln_f
        naive_FV = ((dirs_FD - dirs_FD.mean(-1, keepdim=True)) * norm.weight) @ W_VD.T
    else:  # RMSNorm: Gemma scales by 1 + weight
        weight = model.model.norm.weight.detach()
        gain = 1 + weight if family == "gemma" else weight
        naive_FV = (dirs_FD * gain) @ W_VD.T
    top, top_ids = naive_FV.topk(7, dim=1)
    low, low_ids = naive_FV.topk(7, dim=1, largest=False)
    assert torch.equal(got["logit_pos_ids"].long(), top_ids)
    assert torch.equal(got["logit_neg_ids"].long(), low_ids)
    torch.testing.assert_close(got["logit_pos"], top, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["logit_neg"], low, rtol=1e-4, atol=1e-6)


def test_feature_logit_effects_are_decoder_rows_through_the_unembedding(run):
    stats, _, _, sae, model = run
    naive_FV = (sae.W_dec.detach() * model.model.norm.weight) @ model.lm_head.weight.T
    for f in (0, 5, 77):
        promoted, suppressed = stats.logit_effects(f, n=4)
        values, ids = naive_FV[f].topk(4)
        assert [t for t, _ in promoted] == [stats.vocab[i] for i in ids.tolist()]
        assert [v for _, v in promoted] == pytest.approx(values.tolist(), rel=1e-4)
        values, ids = naive_FV[f].topk(4, largest=False)
        assert [t for t, _ in suppressed] == [stats.vocab[i] for i in ids.tolist()]


def test_a_slice_of_features_equals_those_rows_of_the_full_run(run, words_file):
    stats, _, _, sae, model = run
    part = tiny_feature_stats(
        words_file, sae=sae, model=model, batch_size=BATCH, window=WINDOW, features=slice(10, 20)
    )
    assert part.feature_ids.tolist() == list(range(10, 20))
    torch.testing.assert_close(part.max_act, stats.max_act[10:20])
    for row in range(10):
        assert part.top_examples(row) == stats.top_examples(10 + row)
        assert part.histogram(row) == stats.histogram(10 + row)
        assert part.logit_effects(row) == stats.logit_effects(10 + row)


def test_save_and_load_round_trip(run, tmp_path):
    stats, *_ = run
    stats.save(tmp_path)
    back = FeatureStats.load(tmp_path)
    assert back.meta == stats.meta and back.tensors.keys() == stats.tensors.keys()
    for name, tensor in stats.tensors.items():
        torch.testing.assert_close(back.tensors[name], tensor, rtol=0, atol=0, equal_nan=True)
    for f in (0, 3, 50):
        assert back.top_examples(f) == stats.top_examples(f)
        assert back.quantile_examples(f) == stats.quantile_examples(f)
        assert back.logit_effects(f) == stats.logit_effects(f)


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "missing"])
def test_damaged_files_give_one_line_errors(run, tmp_path, damage):
    stats, *_ = run
    stats.save(tmp_path)
    if damage == "truncate":
        path = tmp_path / STATS_FILENAME
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage_json":
        (tmp_path / META_FILENAME).write_text("{not json")
    else:
        (tmp_path / STATS_FILENAME).unlink()
    with pytest.raises(SaelabError) as error:
        FeatureStats.load(tmp_path)
    assert "\n" not in str(error.value) and "saelab features" in str(error.value)


def test_html_escapes_token_strings(run, tmp_path):
    """What users see of real statistics, every token a script tag and the hook markup: the
    notebook fragment and summary, and the dashboard's feature page and index."""
    stats, *_ = run
    hostile = FeatureStats(stats.tensors, {**stats.meta, "hook": "<b>hook</b>"})
    hostile.vocab = {i: "<script>x</script>" for i in stats.vocab}
    fragment = feature_fragment(hostile, 3)
    assert fragment.startswith('<div class="saelab-feature" data-feature="3"')
    assert "Feature 3" in fragment and "Top " in fragment  # feature 3 fired: contexts shown
    write_dashboard(hostile, tmp_path / "site", pages=[3], progress=False)
    feature_page = (tmp_path / "site" / "features" / "3.html").read_text()
    index = (tmp_path / "site" / "index.html").read_text()
    summary = hostile._repr_html_()  # Jupyter's view of the whole: the run, no tokens
    for html_text in (fragment, feature_page, index):
        assert "<script>x" not in html_text and "&lt;script&gt;x&lt;/script&gt;" in html_text
    for html_text in (fragment, summary, feature_page, index):
        assert "<b>hook" not in html_text and "&lt;b&gt;hook&lt;/b&gt;" in html_text
    for html_text in (fragment, summary, feature_page):  # the index has its own script
        assert "<script" not in html_text


def test_16k_features_keep_fixed_size_tensors(words_file):
    """Memory does not grow with tokens: every tensor but the token ids has the same shape after
    128 and after 384 tokens, [F, K] top-K, [F, 8, n] reservoirs, [F, 32] histograms."""
    F, K, n = 16_384, 4, 2
    sae, model = tiny_sae(d_sae=F, k=8), build_tiny_model("llama")
    shapes = []
    for tokens in (128, 384):
        stats = tiny_feature_stats(
            words_file, tokens=tokens, sae=sae, model=model, top_k=K, n_quantile_examples=n
        )
        shapes.append({k: tuple(v.shape) for k, v in stats.tensors.items() if k != "tokens"})
        assert stats.tokens.numel() == tokens
    assert shapes[0] == shapes[1]
    W = sum(WINDOW) + 1
    expected = {"top_value": (F, K), "top_acts": (F, K, W), "hist": (F, HIST_BINS)}
    expected |= {"q_value": (F, QUANTILE_BUCKETS, n), "q_acts": (F, QUANTILE_BUCKETS, n, W)}
    for name, shape in expected.items():
        assert shapes[0][name] == shape
    assert all(shape[0] == F for shape in shapes[0].values())
