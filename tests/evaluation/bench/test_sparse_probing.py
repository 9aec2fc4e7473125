"""k-sparse probing: the full-activation probe separates a linearly separable task, the top-k
latents by class-mean difference find a planted latent, and bad task files are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.errors import SaelabError
from saelab.evaluation.bench.common import fit_logistic, top_by_mean_difference
from saelab.evaluation.bench.probing import (
    ProbingConfig,
    probe_scores,
    read_task_file,
    split_indices,
)
from tiny_models import build_tiny_tokenizer


def separable_task(n: int = 200, d: int = 24, seed: int = 0):
    """Gaussian inputs labelled by the sign of a fixed direction, with a margin."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    x = torch.randn(4 * n, d, generator=g)
    margin = x @ w / w.norm()
    x = x[margin.abs() > 0.3][:n]
    labels = (x @ w > 0).long().tolist()
    return x, labels


def test_the_full_probe_separates_a_linearly_separable_task():
    x, labels = separable_task()
    train, test = split_indices(labels, 0.25, seed=0)
    # Latents: one of them is the label itself, the rest noise.
    noise = torch.rand(len(labels), 50, generator=torch.Generator().manual_seed(1))
    f = torch.cat([noise, torch.tensor(labels, dtype=torch.float32)[:, None] * 3.0], dim=1)
    scores = probe_scores(x, f, labels, train, test, (1, 5))
    assert scores["full"] == 1.0
    assert scores["k1"] == 1.0 and scores["k5"] == 1.0
    picked = top_by_mean_difference(f[torch.tensor(train)], torch.tensor(labels)[train], 3)
    assert int(picked[0]) == 50


def test_chance_latents_score_near_chance():
    x, labels = separable_task(n=400)
    train, test = split_indices(labels, 0.25, seed=0)
    noise = torch.rand(len(labels), 40, generator=torch.Generator().manual_seed(2))
    scores = probe_scores(None, noise, labels, train, test, (1,))
    assert 0.3 < scores["k1"] < 0.7


def test_batched_probes_equal_separate_fits():
    x, labels = separable_task(n=120, d=6)
    y = torch.tensor(labels, dtype=torch.float32)
    both = fit_logistic(torch.stack([x, x[:, :3].repeat(1, 2)]), torch.stack([y, 1 - y]))
    alone = fit_logistic(x[None], y[None])
    assert torch.allclose(both.w_PD[0], alone.w_PD[0], atol=1e-4)
    shared = fit_logistic(x[None], torch.stack([y, 1 - y]))  # one input, two label sets
    assert torch.allclose(shared.w_PD[0], -shared.w_PD[1], atol=1e-4)


def test_split_is_stratified_and_disjoint():
    labels = [0] * 30 + [1] * 10
    train, test = split_indices(labels, 0.25, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == 40
    assert sum(labels[i] for i in test) == 2 and len(test) == 10


def write_lines(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_user_task_file_is_read_balanced(tmp_path):
    rows = [{"text": f"w{i} w{i + 1}", "label": "yes"} for i in range(3, 30)]
    rows += [{"text": f"w{i}", "label": "no"} for i in range(3, 13)]
    task = read_task_file(write_lines(tmp_path / "t.jsonl", rows), build_tiny_tokenizer(), 40, 8, 0)
    assert sorted(task.labels) == [0] * 10 + [1] * 10  # balanced to the smaller class
    assert all(seq[0] == 1 and len(seq) <= 8 for seq in task.sequences)  # BOS first, cut


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("task.csv", "text,label\na,1\n", "unknown task file format"),
        ("one.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "two labels"),
        ("three.jsonl", "".join(f'{{"text": "a", "label": {i}}}\n' for i in range(3)), "found 3"),
        ("bad.jsonl", '{"text": "a", "label": 1}\nnot json\n', "bad.jsonl:2: not JSON"),
        ("keys.jsonl", '{"words": "a", "label": 1}\n', 'needs {"text"'),
    ],
)
def test_bad_task_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SaelabError, match=message) as raised:
        read_task_file(tmp_path / name, build_tiny_tokenizer(), 40, 8, 0)
    assert "\n" not in str(raised.value)


def test_options_are_checked():
    with pytest.raises(SaelabError, match="unknown probing task 'nope'"):
        ProbingConfig(tasks=("nope",))
    with pytest.raises(SaelabError, match="--ks"):
        ProbingConfig(ks=(0,))
