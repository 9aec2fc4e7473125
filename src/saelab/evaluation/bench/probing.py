"""``saelab bench probing``: k-sparse probing (Gurnee et al. 2023; SAEBench, Karvonen et al.
2025). For a binary task, each text becomes one vector — the model's activation at the SAE's hook
and the SAE's latents, averaged over the text's tokens after BOS — and on the training split the
``k`` latents with the largest |difference of class means| are chosen (k = 1, 2, 5, 10, 20); a
logistic probe on just those latents is scored on the held-out split, beside one on the full
activations (the ceiling the SAE's latents are measured against).

Built-in tasks, made offline (registry :data:`TASKS`):

- ``first_letter``: a word token of the model's vocabulary alone after BOS; does it start with the
  vocabulary's most common initial letter?
- ``code_vs_prose``: a paragraph of the default text (Python's documentation): a doctest
  example (its ``>>>``/``...`` prompts and output lines removed, so the code alone is left) or a
  prose paragraph?
- ``stdlib_group``: a section of a standard-library module's docstrings: from a networking /
  concurrency module (asyncio, http, email, socket, ...) or a text / data module (json, csv, re,
  decimal, datetime, ...)?

A user's task is a JSONL file of ``{"text": ..., "label": ...}`` lines with two distinct labels
(``--task FILE.jsonl``). Classes are balanced by subsampling the larger one; train/test split is
stratified and seeded.

Metrics per SAE (means over the tasks; per task under ``details``): ``probe_full_acc``,
``probe_sae_acc_k1`` ... ``probe_sae_acc_k20``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.config import require
from saelab.errors import SaelabError
from saelab.evaluation.bench.registry import Suite, register_suite
from saelab.registry import Registry


@dataclass(frozen=True)
class ProbeTask:
    """A binary probing task: token sequences (BOS first) and their 0/1 labels."""

    name: str
    sequences: list[list[int]]
    labels: list[int]


TaskBuilder = Callable[[Any, int, int, int], ProbeTask]
"""``(tokenizer, examples, context, seed) -> ProbeTask``."""

TASKS: Registry[TaskBuilder] = Registry("probing task")
"""Built-in probing tasks by name; each builds a balanced task from the model's tokenizer."""


@dataclass(frozen=True)
class ProbingConfig:
    task: str | None = None
    """A JSONL file of {"text", "label"} lines (two labels) to probe instead of the built-in
    tasks."""
    tasks: tuple[str, ...] = ("first_letter", "code_vs_prose", "stdlib_group")
    """Built-in tasks to run (without --task)."""
    examples: int = 400
    """Texts per task, half of each class (fewer when a class has fewer)."""
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    """Numbers of latents the sparse probes may use."""
    test_fraction: float = 0.25
    """Share of each task's texts held out to score the probes."""
    context: int = 64
    """Tokens per text at most, BOS included (longer texts are cut)."""
    batch_size: int = 16
    """Texts per forward pass."""
    seed: int = 0
    """Seeds the choice of texts and the train/test split."""
    model_name: str | None = None
    """Model the SAEs are measured on. Default: the one each SAE was trained on."""
    device: str = "cpu"
    """Where the model and the SAEs run: cpu or cuda."""

    def __post_init__(self) -> None:
        require(self.examples >= 8, f"--examples must be at least 8, got {self.examples}")
        require(bool(self.ks) and min(self.ks) >= 1, f"--ks must be positive, got {self.ks}")
        require(
            0 < self.test_fraction < 1,
            f"--test-fraction must be in (0, 1), got {self.test_fraction}",
        )
        require(self.context >= 2, f"--context must be at least 2, got {self.context}")
        require(self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}")
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"--device must be cpu or cuda, got {self.device!r}",
        )
        if self.task is None:
            require(bool(self.tasks), "--tasks needs at least one task (or pass --task FILE)")
            for name in self.tasks:
                TASKS.lookup(name)


def _balanced(pos: list, neg: list, examples: int, rng: random.Random) -> tuple[list, list]:
    half = min(examples // 2, len(pos), len(neg))
    return rng.sample(pos, half), rng.sample(neg, half)


def _encode_texts(tokenizer, texts: list[str], context: int) -> list[list[int]]:
    from saelab.models.loading import bos_token_id

    bos = bos_token_id(tokenizer)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append([bos, *ids[: context - 1]])
    return out


def _text_task(
    name: str, tokenizer, pos: list[str], neg: list[str], examples: int, context: int, seed: int
) -> ProbeTask:
    rng = random.Random(seed)
    pos, neg = _balanced(pos, neg, examples, rng)
    if not pos:
        raise SaelabError(f"probing task {name!r} has texts of one class only; give it both")
    texts = pos + neg
    labels = [1] * len(pos) + [0] * len(neg)
    return ProbeTask(name, _encode_texts(tokenizer, texts, context), labels)


@TASKS.register("first_letter")
def first_letter_task(tokenizer, examples: int, context: int, seed: int) -> ProbeTask:
    """Word tokens alone after BOS: does the word start with the most common initial letter?"""
    from saelab.evaluation.bench.words import word_tokens
    from saelab.models.loading import bos_token_id

    words = word_tokens(tokenizer)
    initials = [w[0] for w in words]
    letter = max(sorted(set(initials)), key=initials.count)
    rng = random.Random(seed)
    pos, neg = _balanced(
        [w for w in words if w[0] == letter], [w for w in words if w[0] != letter], examples, rng
    )
    bos = bos_token_id(tokenizer)
    sequences = [[bos, words[w]] for w in pos + neg]
    return ProbeTask(f"first_letter_{letter}", sequences, [1] * len(pos) + [0] * len(neg))


_PROMPT = re.compile(r"^\s*(>>>|\.\.\.)( |$)")


def _paragraphs() -> list[str]:
    from saelab.data.corpus import default_documents

    return [p for doc in default_documents() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _doctest_code(paragraph: str) -> str | None:
    """The code of a doctest paragraph (prompts and output lines removed), else None."""
    lines = paragraph.strip("\n").splitlines()
    if not lines or not _PROMPT.match(lines[0]):
        return None
    code = [_PROMPT.sub("", line, count=1) for line in lines if _PROMPT.match(line)]
    text = "\n".join(code).strip()
    return text if len(text) >= 20 else None


def _is_prose(paragraph: str) -> bool:
    text = " ".join(paragraph.split())
    letters = sum(c.isalpha() or c == " " for c in text)
    return (
        len(text) >= 120
        and ">>>" not in text
        and letters / len(text) > 0.9
        and text.rstrip().endswith(".")
    )


@TASKS.register("code_vs_prose")
def code_vs_prose_task(tokenizer, examples: int, context: int, seed: int) -> ProbeTask:
    """Paragraphs of the default text: doctest code (prompts removed) or prose?"""
    paragraphs = _paragraphs()
    code = sorted({c for p in paragraphs if (c := _doctest_code(p))})
    prose = sorted({" ".join(p.split()) for p in paragraphs if _is_prose(p)})
    return _text_task("code_vs_prose", tokenizer, code, prose, examples, context, seed)


STDLIB_GROUPS = {
    "net_and_concurrency": (
        "asyncio",
        "concurrent",
        "multiprocessing",
        "threading",
        "socket",
        "socketserver",
        "selectors",
        "subprocess",
        "http",
        "urllib",
        "email",
        "smtplib",
        "ftplib",
        "imaplib",
        "poplib",
        "ssl",
        "xmlrpc",
        "queue",
        "sched",
        "signal",
        "mailbox",
        "wsgiref",
    ),
    "text_and_data": (
        "json",
        "csv",
        "re",
        "string",
        "textwrap",
        "difflib",
        "html",
        "xml",
        "decimal",
        "fractions",
        "statistics",
        "datetime",
        "calendar",
        "collections",
        "heapq",
        "bisect",
        "pprint",
        "base64",
        "binascii",
        "struct",
        "codecs",
        "gettext",
        "locale",
        "configparser",
        "tomllib",
        "plistlib",
        "numbers",
        "random",
        "_pydecimal",
        "_strptime",
        "shlex",
    ),
}
"""Standard-library top-level modules of the two groups of the ``stdlib_group`` task."""


def _module_sections() -> dict[str, list[str]]:
    """Per group of :data:`STDLIB_GROUPS`: the sections (a header line and its docstring) of
    its modules' digests in the default text."""
    from saelab.data.corpus import default_documents

    group_of = {m: g for g, mods in STDLIB_GROUPS.items() for m in mods}
    out: dict[str, list[str]] = {g: [] for g in STDLIB_GROUPS}
    for doc in default_documents():
        if not doc.startswith("module "):
            continue
        module = doc.split("\n", 1)[0].removeprefix("module ").split(".")[0]
        group = group_of.get(module)
        if group is None:
            continue
        sections = re.split(r"\n\n(?=(?:class|def|async def) )", doc)
        out[group].extend(s.strip() for s in sections[1:] if len(s.strip()) >= 80)
    return out


@TASKS.register("stdlib_group")
def stdlib_group_task(tokenizer, examples: int, context: int, seed: int) -> ProbeTask:
    """Docstring sections of the default text: from a networking/concurrency module or a
    text/data module?"""
    groups = _module_sections()
    return _text_task(
        "stdlib_group",
        tokenizer,
        groups["net_and_concurrency"],
        groups["text_and_data"],
        examples,
        context,
        seed,
    )


def read_task_file(
    path: str | Path, tokenizer, examples: int, context: int, seed: int
) -> ProbeTask:
    """A user's task: JSONL lines ``{"text": str, "label": any}`` with exactly two distinct
    labels (the one sorting second, as text, is class 1). One-line errors for another format,
    a bad line, or one class."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise SaelabError(
            f"{path}: unknown task file format {path.suffix or '(no suffix)'!r}; give a .jsonl "
            'file of {"text": ..., "label": ...} lines'
        )
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SaelabError(f"{path}: no such task file") from None
    except UnicodeDecodeError:
        raise SaelabError(f"{path}: not UTF-8 text; give a JSONL task file") from None
    by_label: dict[str, list[str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SaelabError(
                f"{path}:{number}: not JSON ({exc.msg}); one object per line"
            ) from None
        if not (isinstance(row, dict) and isinstance(row.get("text"), str) and "label" in row):
            raise SaelabError(
                f'{path}:{number}: each line needs {{"text": "...", "label": ...}}; '
                f"got {line[:60]!r}"
            )
        by_label.setdefault(json.dumps(row["label"], sort_keys=True), []).append(row["text"])
    if len(by_label) != 2:
        raise SaelabError(
            f"{path}: a probing task needs exactly two labels, found {len(by_label)}"
            + (f" ({', '.join(sorted(by_label))})" if by_label else "")
            + "; give texts of both classes"
        )
    neg_label, pos_label = sorted(by_label)
    return _text_task(
        path.stem, tokenizer, by_label[pos_label], by_label[neg_label], examples, context, seed
    )


def split_indices(
    labels: list[int], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """A stratified, seeded train/test split of ``range(len(labels))``; each split gets at least
    one text of each class."""
    rng = random.Random(seed)
    train, test = [], []
    for cls in (0, 1):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def probe_scores(
    x_ND, f_NF, labels: list[int], train: list[int], test: list[int], ks: tuple[int, ...]
) -> dict[str, float]:
    """Test accuracy of a logistic probe on the full activations ``x_ND`` (``full``) and on the
    top-``k`` latents of ``f_NF`` by class-mean difference on the training split (``k1``...)."""
    import torch

    from saelab.evaluation.bench.common import accuracy, fit_logistic, top_by_mean_difference

    y = torch.tensor(labels, dtype=torch.float32)
    tr, te = torch.tensor(train), torch.tensor(test)
    scores: dict[str, float] = {}
    if x_ND is not None:
        probe = fit_logistic(x_ND[tr][None], y[tr][None])
        scores["full"] = float(accuracy(probe.logits(x_ND[te][None]), y[te][None])[0])
    for k in ks:
        idx = top_by_mean_difference(f_NF[tr], y[tr], k)
        probe = fit_logistic(f_NF[tr][:, idx][None], y[tr][None])
        scores[f"k{k}"] = float(accuracy(probe.logits(f_NF[te][:, idx][None]), y[te][None])[0])
    return scores


def run_probing(
    sae_dirs: list[Path], opts: ProbingConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """k-sparse probing of each SAE on each task: ``{"suite": "probing", "saes": {dir:
    {"metrics", "info", "details": {task: {"full", "k1", ...}}}}}``. SAEs sharing a model share
    its forward passes (one per batch of texts, for all their hooks)."""
    from saelab.evaluation.bench.passes import (
        check_reachable,
        load_saes,
        model_name_of,
        sequence_features,
    )
    from saelab.models.loading import load_model

    opts = opts or ProbingConfig()
    loaded = load_saes(sae_dirs, device=opts.device)
    by_model: dict[str, list] = {}
    for item in loaded:
        by_model.setdefault(model_name_of(item, opts.model_name), []).append(item)
    details: dict[str, dict[str, dict[str, float]]] = {item.key: {} for item in loaded}
    for name, members in by_model.items():
        model, tokenizer = load_model(name, device=opts.device)
        check_reachable(model, members, name)
        if opts.task is not None:
            tasks = [read_task_file(opts.task, tokenizer, opts.examples, opts.context, opts.seed)]
        else:
            tasks = [
                TASKS.lookup(t)(tokenizer, opts.examples, opts.context, opts.seed)
                for t in opts.tasks
            ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for task in tasks:
            acts, feats = sequence_features(
                model,
                task.sequences,
                members,
                pad_id=pad,
                batch_size=opts.batch_size,
                progress=progress,
                desc=f"probing {task.name}",
            )
            train, test = split_indices(task.labels, opts.test_fraction, opts.seed)
            full: dict[str, float] = {}
            for item, f_NF in zip(members, feats, strict=True):
                if item.hook not in full:
                    full[item.hook] = probe_scores(
                        acts[item.hook], f_NF[:, :1], task.labels, train, test, ()
                    )["full"]
                scores = probe_scores(None, f_NF, task.labels, train, test, opts.ks)
                details[item.key][task.name] = {"full": full[item.hook], **scores}
    saes = {}
    for item in loaded:
        per_task = details[item.key]
        metrics = {
            "probe_full_acc": _mean(t["full"] for t in per_task.values()),
            **{
                f"probe_sae_acc_k{k}": _mean(t[f"k{k}"] for t in per_task.values()) for k in opts.ks
            },
        }
        saes[item.key] = {"metrics": metrics, "info": item.info, "details": per_task}
    return {"suite": "probing", "saes": saes}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


register_suite(
    Suite(
        name="probing",
        help="k-sparse probing: top-k latents vs the full activations on binary tasks",
        options=ProbingConfig,
        needs_sae_dirs=True,
        run=run_probing,
    )
)
