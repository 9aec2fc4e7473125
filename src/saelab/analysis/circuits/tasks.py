"""Circuit tasks: prompts whose next token should be `correct` rather than `incorrect`.

Two sources, one registry (:data:`TASKS`):

* ``ioi``: indirect object identification (METHODS §9.2). Fifteen templates in BABA and ABBA
  order, names, places and objects that are single tokens (with a leading space) for the given
  tokenizer; the answer is the indirect object (IO), the distractor the subject (S). Each prompt
  has a corrupted ABC twin: the same template with three distinct names.
* a ``.jsonl`` file of ``{"prompt", "correct", "incorrect"[, "corrupted_prompt"]}`` lines, for any
  model and tokenizer.

Prompts are tokenised as training text is (:mod:`saelab.data.text`): no special tokens from the
tokenizer, BOS prepended. Batches are right-padded with an attention mask, so every real token
sits where it would without padding and the metric is read at each prompt's last real token.

Example:
    >>> task = ioi_task(tokenizer, n_prompts=8)
    >>> batch = tokenize_task(task, tokenizer)
    >>> logit_diff(model(batch.tokens_NP, attention_mask=batch.mask_NP).logits, batch)
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from saelab.errors import SaelabError
from saelab.models.loading import bos_token_id

log = logging.getLogger(__name__)

# BABA order (METHODS §9.2): {N1} = S, {N2} = IO, {N3} = S. The prompt stops before the final IO,
# on " to" with no trailing space (a trailing space changes the answer token).
IOI_TEMPLATES: tuple[str, ...] = (
    "Then, {N1} and {N2} went to the {PLACE}. {N3} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {N3} gave a {OBJECT} to",
    "Then, {N1} and {N2} were working at the {PLACE}. {N3} decided to give a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {N3} wanted to give a "
    "{OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {N3} said to",
    "After {N1} and {N2} went to the {PLACE}, {N3} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {N3} decided to give it to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {N3} decided to give the {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {N3} gave a {OBJECT} to",
    "While {N1} and {N2} were commuting to the {PLACE}, {N3} gave a {OBJECT} to",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {N3} gave a {OBJECT} to",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {N3} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument. Afterwards {N3} said to",
    "The {PLACE} {N1} and {N2} went to had a {OBJECT}. {N3} gave it to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {N3} gave it to",
)
IOI_PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)  # fmt: skip
IOI_OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)  # fmt: skip
IOI_NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Michael", "David", "Sarah", "Emma",
    "Anna", "Kate", "Paul", "Mark", "Peter", "Lisa", "Laura", "Rachel", "Daniel", "Chris",
    "Jack", "Ryan", "Eric", "Adam", "Sam", "Max", "Ben", "Dan", "Tim", "Joe",
    "Steve", "Kevin", "Jason", "Brian", "Amy", "Jane", "Rose", "Grace", "Lucy", "Emily",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """Prompts with the token that should follow each (`correct`) and a rival (`incorrect`).

    Answers are strings as they follow the prompt, usually with a leading space (``" Mary"``).
    `corrupted` (optional) holds one prompt per clean prompt with the same number of tokens,
    whose activations are the patch states of attribution; without it the patch is zero.
    """

    name: str
    prompts: tuple[str, ...]
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    corrupted: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None
    """Where each prompt came from (``file:line``), named in errors about it."""

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if n == 0:
            raise SaelabError(f"task {self.name!r} has no prompts; give it at least one")
        lengths = {len(self.correct), len(self.incorrect)}
        if self.corrupted is not None:
            lengths.add(len(self.corrupted))
        if lengths != {n}:
            raise SaelabError(
                f"task {self.name!r}: {n} prompts but answer/corrupted lists of lengths "
                f"{sorted(lengths)}; give one of each per prompt"
            )


@dataclass(frozen=True)
class TaskBatch:
    """A task's prompts as one right-padded token batch."""

    tokens_NP: Int[Tensor, "N P"]
    mask_NP: Bool[Tensor, "N P"]
    """True at real tokens (BOS included), False at padding."""
    last_N: Int[Tensor, " N"]
    """Index of each prompt's last real token, where the metric is read."""
    correct_N: Int[Tensor, " N"]
    incorrect_N: Int[Tensor, " N"]
    corrupted_NP: Int[Tensor, "N P"] | None = None
    """The corrupted prompts, token for token aligned with `tokens_NP` (same mask)."""

    def __len__(self) -> int:
        return self.tokens_NP.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        moved = {
            name: None if value is None else value.to(device) for name, value in vars(self).items()
        }
        return TaskBatch(**moved)


def last_positions(batch: TaskBatch) -> Int[Tensor, " U"]:
    """The distinct positions where some prompt ends, ascending: the only logits a metric
    reads, so the LM head (a large share of a small model's compute) can skip the rest."""
    return torch.unique(batch.last_N)


def logit_diff(logits_NPV: Float[Tensor, "N P V"], batch: TaskBatch) -> Float[Tensor, " N"]:
    """``logit(correct) − logit(incorrect)`` at each prompt's last real token.

    `logits_NPV` holds every position, or only those of :func:`last_positions` (in order).
    """
    last_N = batch.last_N
    if logits_NPV.shape[1] != batch.tokens_NP.shape[1]:
        last_N = torch.searchsorted(last_positions(batch), last_N)
    last_NV = logits_NPV[torch.arange(len(batch), device=logits_NPV.device), last_N]
    correct_N = last_NV.gather(-1, batch.correct_N[:, None]).squeeze(-1)
    incorrect_N = last_NV.gather(-1, batch.incorrect_N[:, None]).squeeze(-1)
    return correct_N - incorrect_N


@torch.no_grad()
def clean_metric(
    model: Any,
    batch: TaskBatch,
    metric: Callable[[Tensor, TaskBatch], Tensor] | None = None,
) -> Float[Tensor, " N"]:
    """The metric (:func:`logit_diff` by default) of every prompt on the unmodified model."""
    logits_NPV = model(
        batch.tokens_NP,
        attention_mask=batch.mask_NP.long(),
        use_cache=False,
        logits_to_keep=last_positions(batch),
    ).logits
    return (metric or logit_diff)(logits_NPV, batch)


# ---------------------------------------------------------------- tokenisation


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt as the model saw text in training: BOS, then the text's tokens."""
    return [bos_token_id(tokenizer), *_ids(tokenizer, text)]


def tokenize_task(task: Task, tokenizer: Any) -> TaskBatch:
    """Tokenise, BOS-prefix and right-pad `task`'s prompts (and corrupted prompts).

    An answer of several tokens is scored by its first token (with a warning).
    """
    rows = [prompt_ids(tokenizer, p) for p in task.prompts]
    corrupted_rows = None
    if task.corrupted is not None:
        corrupted_rows = [prompt_ids(tokenizer, p) for p in task.corrupted]
        for i, (row, other) in enumerate(zip(rows, corrupted_rows, strict=True)):
            if len(row) != len(other):
                raise SaelabError(
                    f"{_where(task, i)}: the corrupted prompt has {len(other) - 1} tokens but "
                    f"the prompt has {len(row) - 1}; corrupted prompts must tokenise to the "
                    "same length"
                )
    correct = [_answer_id(tokenizer, task, i, task.correct[i]) for i in range(len(rows))]
    incorrect = [_answer_id(tokenizer, task, i, task.incorrect[i]) for i in range(len(rows))]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_token_id(tokenizer)
    tokens_NP, mask_NP = _right_pad(rows, pad)
    return TaskBatch(
        tokens_NP=tokens_NP,
        mask_NP=mask_NP,
        last_N=mask_NP.sum(-1) - 1,
        correct_N=torch.tensor(correct),
        incorrect_N=torch.tensor(incorrect),
        corrupted_NP=None if corrupted_rows is None else _right_pad(corrupted_rows, pad)[0],
    )


def _right_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens_NP = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_NP = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens_NP[i, : len(row)] = torch.tensor(row)
        mask_NP[i, : len(row)] = True
    return tokens_NP, mask_NP


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_id(tokenizer: Any, task: Task, i: int, answer: str) -> int:
    ids = _ids(tokenizer, answer)
    if not ids:
        raise SaelabError(f"{_where(task, i)}: answer {answer!r} has no tokens; give a word")
    if len(ids) > 1:
        log.warning(
            "%s: answer %r is %d tokens; scoring its first token %r",
            _where(task, i),
            answer,
            len(ids),
            tokenizer.decode(ids[:1]),
        )
    return ids[0]


def _where(task: Task, i: int) -> str:
    return task.sources[i] if task.sources is not None else f"{task.name} prompt {i + 1}"


# ---------------------------------------------------------------- IOI


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The `words` that are one known token with a leading space (as they appear mid-sentence);
    a word the tokenizer maps to its unknown token is no word of its vocabulary."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    tokens = {w: _ids(tokenizer, " " + w) for w in words}
    return [w for w in words if len(tokens[w]) == 1 and tokens[w][0] != unknown]


def ioi_task(
    tokenizer: Any,
    n_prompts: int = 32,
    *,
    seed: int = 0,
    names: Sequence[str] = IOI_NAMES,
    places: Sequence[str] = IOI_PLACES,
    objects: Sequence[str] = IOI_OBJECTS,
    templates: Sequence[str] = IOI_TEMPLATES,
) -> Task:
    """`n_prompts` IOI prompts, alternating BABA and ABBA, with corrupted ABC twins.

    Names, places and objects that are not a single token (with a leading space) for
    `tokenizer` are dropped; fewer than three names is an error.
    """
    names = single_token_words(tokenizer, names)
    places = single_token_words(tokenizer, places)
    objects = single_token_words(tokenizer, objects)
    if len(names) < 3:
        raise SaelabError(
            f"only {len(names)} IOI names are single tokens for this tokenizer (3 needed); "
            "pass names= that are, or use a .jsonl task"
        )
    if not places or not objects:
        raise SaelabError(
            "no IOI place or object is a single token for this tokenizer; pass places= and "
            "objects= that are, or use a .jsonl task"
        )
    rng = random.Random(seed)
    prompts, corrupted, correct, incorrect = [], [], [], []
    for i in range(n_prompts):
        template = templates[rng.randrange(len(templates))]
        io, s = rng.sample(names, 2)
        # BABA: S, IO, S. ABBA: IO, S, S. Alternating keeps the two orders balanced.
        first, second = (s, io) if i % 2 == 0 else (io, s)
        fill = {"PLACE": rng.choice(places), "OBJECT": rng.choice(objects)}
        prompts.append(template.format(N1=first, N2=second, N3=s, **fill))
        a, b, c = rng.sample(names, 3)
        corrupted.append(template.format(N1=a, N2=b, N3=c, **fill))
        correct.append(" " + io)
        incorrect.append(" " + s)
    return Task(
        name="ioi",
        prompts=tuple(prompts),
        correct=tuple(correct),
        incorrect=tuple(incorrect),
        corrupted=tuple(corrupted),
    )


# ---------------------------------------------------------------- JSONL


JSONL_FIELDS = ("prompt", "correct", "incorrect")
CORRUPTED_FIELD = "corrupted_prompt"


def jsonl_task(path: str | Path, n_prompts: int | None = None) -> Task:
    """A task from a JSONL file, one ``{"prompt", "correct", "incorrect"}`` object per line,
    each optionally with a ``"corrupted_prompt"`` (all lines or none). Blank lines are skipped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SaelabError(f"no task file at {path}; pass 'ioi' or a .jsonl file")
    records: list[tuple[str, dict[str, str]]] = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if n_prompts is not None and len(records) == n_prompts:
                    break
                records.append((f"{path}:{number}", _parse_line(line, f"{path}:{number}")))
    except UnicodeDecodeError as e:
        raise SaelabError(
            f"{path} is not UTF-8 text (byte {e.start}); pass a .jsonl file"
        ) from None
    if not records:
        raise SaelabError(f"{path} holds no task lines; write one JSON object per line")
    with_corrupted = [where for where, r in records if CORRUPTED_FIELD in r]
    if with_corrupted and len(with_corrupted) != len(records):
        missing = next(where for where, r in records if CORRUPTED_FIELD not in r)
        raise SaelabError(
            f"{missing} has no {CORRUPTED_FIELD!r} but other lines do; give it on every line "
            "or on none"
        )
    rows = [r for _, r in records]
    return Task(
        name=path.stem,
        prompts=tuple(r["prompt"] for r in rows),
        correct=tuple(r["correct"] for r in rows),
        incorrect=tuple(r["incorrect"] for r in rows),
        corrupted=tuple(r[CORRUPTED_FIELD] for r in rows) if with_corrupted else None,
        sources=tuple(where for where, _ in records),
    )


def _parse_line(line: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SaelabError(
            f"{where} is not valid JSON ({e.msg}); write one object per line"
        ) from None
    if not isinstance(record, dict):
        raise SaelabError(f"{where} is a {type(record).__name__}, not an object; write {{...}}")
    wanted = (*JSONL_FIELDS, *([CORRUPTED_FIELD] if CORRUPTED_FIELD in record else []))
    for key in wanted:
        value = record.get(key)
        if not isinstance(value, str) or not value:
            got = "missing" if key not in record else f"{value!r}"
            raise SaelabError(
                f"{where}: field {key!r} is {got}; give a non-empty string "
                f"(fields: {', '.join(JSONL_FIELDS)}[, {CORRUPTED_FIELD}])"
            )
    return {key: record[key] for key in wanted}


TASKS: dict[str, Callable[..., Task]] = {"ioi": ioi_task}
"""Built-in tasks by name; anything else given as a task must be a .jsonl file."""


def load_task(spec: str, tokenizer: Any, n_prompts: int = 32, seed: int = 0) -> Task:
    """``ioi`` (or another name in :data:`TASKS`) or a path to a .jsonl task file."""
    if spec in TASKS:
        return TASKS[spec](tokenizer, n_prompts, seed=seed)
    if spec.endswith(".jsonl") or Path(spec).expanduser().is_file():
        return jsonl_task(spec, n_prompts)
    raise SaelabError(f"unknown task {spec!r}; pass one of {sorted(TASKS)} or a .jsonl file")
