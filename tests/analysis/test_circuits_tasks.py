"""Circuit tasks: IOI prompt structure, JSONL parsing and its errors, tokenisation, the metric."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from circuit_fixtures import words_task

from saelab.analysis.circuits.tasks import (
    IOI_NAMES,
    IOI_OBJECTS,
    IOI_PLACES,
    IOI_TEMPLATES,
    ioi_task,
    jsonl_task,
    load_task,
    logit_diff,
    tokenize_task,
)
from saelab.errors import SaelabError
from tiny_models import build_tiny_tokenizer

TINY_NAMES = ["w10", "w11", "w12", "w13", "w14"]


def names_in(text: str, names) -> list[str]:
    return [w for w in re.findall(r"\w+", text) if w in names]


def check_ioi_structure(task, names) -> None:
    assert len(IOI_TEMPLATES) == 15
    for i, (prompt, io, s, twin) in enumerate(
        zip(task.prompts, task.correct, task.incorrect, task.corrupted, strict=True)
    ):
        assert prompt.endswith(" to") and not prompt.endswith(" ")
        io, s = io.strip(), s.strip()
        assert io != s
        mentions = names_in(prompt, names)
        # BABA (even prompts): S IO S; ABBA (odd): IO S S.
        assert mentions == ([s, io, s] if i % 2 == 0 else [io, s, s])
        corrupted_names = names_in(twin, names)
        assert len(corrupted_names) == 3 and len(set(corrupted_names)) == 3  # ABC
        # Apart from the names, the corrupted prompt is the same text.
        pattern = r"\b(" + "|".join(names) + r")\b"
        assert re.sub(pattern, "NAME", prompt) == re.sub(pattern, "NAME", twin)


def test_ioi_structure_with_custom_single_token_words():
    tokenizer = build_tiny_tokenizer()
    task = ioi_task(tokenizer, 30, names=TINY_NAMES, places=["w20"], objects=["w30", "w31"])
    check_ioi_structure(task, TINY_NAMES)
    batch = tokenize_task(task, tokenizer)
    ids = {n: tokenizer(" " + n, add_special_tokens=False)["input_ids"][0] for n in TINY_NAMES}
    assert batch.correct_N.tolist() == [ids[a.strip()] for a in task.correct]
    assert batch.corrupted_NP.shape == batch.tokens_NP.shape
    assert ((batch.tokens_NP != batch.corrupted_NP).sum(-1) <= 3).all()  # only names differ


def test_ioi_needs_three_single_token_names():
    tokenizer = build_tiny_tokenizer()
    with pytest.raises(SaelabError, match="only 2 IOI names") as caught:
        ioi_task(tokenizer, 4, names=["w10", "w11", "Mary"], places=["w20"], objects=["w30"])
    assert "\n" not in str(caught.value)
    with pytest.raises(SaelabError, match="only 0 IOI names"):
        load_task("ioi", tokenizer)  # the default names are not words of the tiny vocabulary


def test_tokenize_prepends_bos_right_pads_and_marks_the_last_token():
    tokenizer = build_tiny_tokenizer()
    task = words_task(4)
    batch = tokenize_task(task, tokenizer)
    for i, prompt in enumerate(task.prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(ids) + 1
        assert batch.tokens_NP[i, :n].tolist() == [tokenizer.bos_token_id, *ids]
        assert batch.mask_NP[i].tolist() == [True] * n + [False] * (batch.tokens_NP.shape[1] - n)
        assert int(batch.last_N[i]) == n - 1


def test_logit_diff_reads_each_prompts_last_token_from_all_or_only_the_last_positions():
    batch = tokenize_task(words_task(4), build_tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.tokens_NP.shape, 256, generator=g)
    expected = torch.tensor(
        [
            logits[i, batch.last_N[i], batch.correct_N[i]]
            - logits[i, batch.last_N[i], batch.incorrect_N[i]]
            for i in range(len(batch))
        ]
    )
    assert torch.equal(logit_diff(logits, batch), expected)
    kept = logits[:, torch.unique(batch.last_N)]
    assert torch.equal(logit_diff(kept, batch), expected)


def write_lines(path, lines) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_jsonl_task_reads_prompts_answers_and_corrupted_prompts(tmp_path):
    rows = [
        {"prompt": "w5 w6", "correct": " w7", "incorrect": " w8", "corrupted_prompt": "w9 w6"},
        {"prompt": "w5 w6 w7", "correct": "w9", "incorrect": "w10", "corrupted_prompt": "a b c"},
    ]
    path = write_lines(tmp_path / "t.jsonl", [rows[0], "", rows[1]])
    task = jsonl_task(path)
    assert task.prompts == ("w5 w6", "w5 w6 w7")
    assert task.corrupted == ("w9 w6", "a b c")
    assert task.sources == (f"{path}:1", f"{path}:3")
    assert jsonl_task(path, n_prompts=1).prompts == ("w5 w6",)
    assert load_task(path, build_tiny_tokenizer()).prompts == task.prompts


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('["a"]', "not an object"),
        ({"prompt": "w5", "correct": "w6"}, "field 'incorrect' is missing"),
        ({"prompt": "", "correct": "w6", "incorrect": "w7"}, "field 'prompt' is ''"),
        ({"prompt": "w5", "correct": 3, "incorrect": "w7"}, "field 'correct' is 3"),
    ],
)
def test_bad_jsonl_lines_give_one_line_errors_with_the_line_number(tmp_path, line, message):
    good = {"prompt": "w5", "correct": "w6", "incorrect": "w7"}
    path = write_lines(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(SaelabError, match=re.escape(message)) as caught:
        jsonl_task(path)
    assert f"{path}:2" in str(caught.value) and "\n" not in str(caught.value)


def test_corrupted_prompts_on_some_lines_only_or_of_another_length_are_refused(tmp_path):
    good = {"prompt": "w5 w6", "correct": "w6", "incorrect": "w7"}
    path = write_lines(tmp_path / "mixed.jsonl", [{**good, "corrupted_prompt": "w8 w9"}, good])
    with pytest.raises(SaelabError, match=re.escape(f"{path}:2 has no 'corrupted_prompt'")):
        jsonl_task(path)
    lines = [{**good, "corrupted_prompt": "w8 w9"}, {**good, "corrupted_prompt": "w8 w9 w10"}]
    path = write_lines(tmp_path / "long.jsonl", lines)
    task = jsonl_task(path)
    with pytest.raises(SaelabError, match=re.escape(f"{path}:2: the corrupted prompt has 3")):
        tokenize_task(task, build_tiny_tokenizer())


def test_a_multi_token_answer_is_scored_by_its_first_token_with_a_warning(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    path = write_lines(
        tmp_path / "t.jsonl", [{"prompt": "w5", "correct": "w6 w7", "incorrect": "w8"}]
    )
    with caplog.at_level(logging.WARNING):
        batch = tokenize_task(jsonl_task(path), tokenizer)
    assert batch.correct_N.tolist() == tokenizer("w6", add_special_tokens=False)["input_ids"]
    assert "first token" in caplog.text and f"{path}:1" in caplog.text


def test_unknown_task_names_the_choices():
    with pytest.raises(SaelabError, match=r"unknown task 'ioj'.*\['ioi'\]"):
        load_task("ioj", build_tiny_tokenizer())
    with pytest.raises(SaelabError, match="no task file"):
        load_task("missing.jsonl", build_tiny_tokenizer())


@pytest.mark.slow
def test_ioi_on_the_default_tokenizer_uses_single_tokens_and_the_ioi_structure():
    from transformers import AutoTokenizer

    from saelab.models.loading import default_gguf_path, gguf_cache_dir, load_model

    cached = gguf_cache_dir(default_gguf_path())
    if not cached.is_dir():  # the first load dequantises and caches the model
        load_model("default")
    tokenizer = AutoTokenizer.from_pretrained(cached)
    single = lambda w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    assert all(single(w) for w in (*IOI_NAMES, *IOI_PLACES, *IOI_OBJECTS))
    task = ioi_task(tokenizer, 60, seed=3)
    check_ioi_structure(task, IOI_NAMES)
    batch = tokenize_task(task, tokenizer)
    assert (batch.tokens_NP[:, 0] == tokenizer.bos_token_id).all()
    to_id = tokenizer(" to", add_special_tokens=False)["input_ids"]
    assert batch.tokens_NP[torch.arange(len(batch)), batch.last_N].tolist() == to_id * len(batch)
    # Single-token names: the corrupted twin lines up token for token, only names differ.
    differ_N = ((batch.tokens_NP != batch.corrupted_NP) & batch.mask_NP).sum(-1)
    assert (differ_N <= 3).all() and (differ_N >= 1).all()
