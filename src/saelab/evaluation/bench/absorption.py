"""``saelab bench absorption``: feature absorption on the first-letter task (Chanin et al. 2024,
"A is for Absorption"; as SAEBench, Karvonen et al. 2025, measures it).

1. **Words and prompts.** Word tokens of the model's own vocabulary (a space and a lower-case
   word: ``" house"``) are sampled and split into train and test words. Each word gets an
   in-context spelling prompt from a template: ``icl_examples`` other words with their answers,
   one per line (``" table has the first letter: T"``), then the word's own line without the
   answer. The model's activation at the SAE's hook is read at the word's token. One forward
   pass per prompt serves every SAE on that hook.
2. **Probes.** One logistic probe per letter (one-vs-rest, on the train words' activations): the
   ground truth of "this token starts with L". Letters whose probe has test F1 below
   ``min_probe_f1`` or too few test words are left out (as SAEBench does).
3. **Main latents** per letter by k-sparse probing on the SAE's latents (train words): latents
   ranked by |difference of class means|, a logistic probe on the top k for k = 1 ... ``max_k``;
   the main latents are the top k*, where k grows while the test F1 rises by more than
   ``f1_jump`` (SAEBench's feature-split rule).
4. **Absorption.** For each test word of letter L that the probe calls L (a true positive):
   *full absorption* when every main latent is silent, the probe's projection
   ``p = (x − b_dec)·u`` (u the unit probe direction, in the activation's units; b_dec the SAE's
   bias, which the latents do not explain) is positive, and the latent with the largest
   projection ``a_i · (d_i·u)`` (its actual contribution to the reconstruction) has cosine
   ≥ ``cos_threshold`` with u and carries ≥ ``projection_threshold`` of p. ``absorption_rate``
   of a letter = absorbed true positives / true positives. The *absorption fraction* (SAEBench's
   partial measure): the share of p carried by up to three other latents aligned with u
   (cosine ≥ ``fraction_cos_threshold``) rather than by the main latents.

Choices made here: SAEBench uses ``activation × cosine`` as a latent's projection (assuming unit
decoder rows); saelab uses the decoder row itself, so architectures without unit-norm rows
(ReLU) are measured fairly; the projection is of ``x − b_dec`` (SAEBench: ``x``). Probes are
one-vs-rest binary probes (SAEBench: a 26-way probe, read one-vs-rest).

Metrics per SAE: ``absorption_rate``, ``absorption_fraction`` (means over the letters scored),
``absorption_main_latents`` (mean k*), ``absorption_letters``; per letter under ``details``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.config import require
from saelab.errors import SaelabError
from saelab.evaluation.bench.registry import Suite, register_suite

EPS = 1e-8

TEMPLATES = (
    "{word} has the first letter:",
    "The word{word} starts with the letter",
    "Spell{word}. It begins with",
)
"""Prompt templates: ``{word}`` is replaced by the word's token (which carries its leading
space); an in-context example ends with a space and the capital first letter."""


@dataclass(frozen=True)
class AbsorptionConfig:
    words: int = 1500
    """Word tokens sampled from the model's vocabulary (train and test together)."""
    test_fraction: float = 0.3
    """Share of the words held out to score the probes and measure absorption."""
    icl_examples: int = 4
    """In-context examples (other words with their first letter) before each word."""
    templates: tuple[str, ...] = TEMPLATES
    """Prompt templates with {word}; the words take them in turn."""
    max_k: int = 10
    """Most latents a letter's main latents may number (k-sparse probing up to this k)."""
    f1_jump: float = 0.03
    """A k-sparse probe's test F1 must rise by more than this for one more main latent."""
    min_probe_f1: float = 0.6
    """Letters whose probe's test F1 is below this are not scored."""
    min_test_words: int = 5
    """Letters with fewer test words are not scored."""
    cos_threshold: float = 0.025
    """Full absorption: least cosine between the absorbing latent's decoder row and the probe."""
    projection_threshold: float = 0.4
    """Least share of the probe projection the absorbing latent(s) must carry."""
    fraction_cos_threshold: float = 0.1
    """Absorption fraction: least cosine of a latent counted as absorbing."""
    batch_size: int = 16
    """Prompts per forward pass."""
    seed: int = 0
    """Seeds the words, their split and the in-context examples."""
    model_name: str | None = None
    """Model the SAEs are measured on. Default: the one each SAE was trained on."""
    device: str = "cpu"
    """Where the model and the SAEs run: cpu or cuda."""

    def __post_init__(self) -> None:
        require(self.words >= 20, f"--words must be at least 20, got {self.words}")
        require(
            0 < self.test_fraction < 1,
            f"--test-fraction must be in (0, 1), got {self.test_fraction}",
        )
        require(self.icl_examples >= 0, "--icl-examples must be >= 0")
        require(bool(self.templates), "--templates needs at least one template")
        for template in self.templates:
            require(
                template.count("{word}") == 1,
                f"template {template!r} must contain {{word}} exactly once",
            )
        require(self.max_k >= 1, f"--max-k must be positive, got {self.max_k}")
        require(self.min_test_words >= 1, "--min-test-words must be positive")
        require(self.batch_size >= 1, "--batch-size must be positive")
        require(
            self.device.split(":")[0] in ("cpu", "cuda"),
            f"--device must be cpu or cuda, got {self.device!r}",
        )


# ----- prompts --------------------------------------------------------------------------------


def build_prompts(
    tokenizer, words: dict[str, int], chosen: list[str], opts: AbsorptionConfig
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each chosen word's prompt (BOS first) and the position of its word token."""
    from saelab.models.loading import bos_token_id

    bos = bos_token_id(tokenizer)
    rng = random.Random(opts.seed + 1)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    sequences, positions = [], []
    for i, word in enumerate(chosen):
        template = opts.templates[i % len(opts.templates)]
        before, after = template.split("{word}")
        others = rng.sample(
            [w for w in chosen if w != word], min(opts.icl_examples, len(chosen) - 1)
        )
        context = "".join(
            template.replace("{word}", f" {w}") + f" {w[0].upper()}\n" for w in others
        )
        seq = [bos, *ids(context + before)]
        positions.append(len(seq))
        seq += [words[word], *ids(after)]
        sequences.append(seq)
    return sequences, positions


# ----- the measurement on activations (model-free, so tests can hand it a synthetic task) ------


@dataclass
class LetterProbes:
    """One-vs-rest probes, one per letter scored, fitted on the train words' activations."""

    letters: list[str]
    direction_LD: Tensor
    """Unit probe directions in the activation's units."""
    test_pred_LN: Tensor
    """Whether each letter's probe calls each test word that letter."""
    f1_L: Tensor
    """Each probe's test F1."""


def fit_letter_probes(
    x_ND: Tensor, letters: list[str], train: list[int], test: list[int], opts: AbsorptionConfig
) -> LetterProbes:
    """Probes for the letters with at least ``min_test_words`` test words and one train word;
    those with test F1 ≥ ``min_probe_f1`` are kept."""
    from saelab.evaluation.bench.common import f1_score, fit_logistic

    tr, te = torch.tensor(train), torch.tensor(test)
    candidates = sorted(
        {
            c
            for c in set(letters)
            if sum(letters[i] == c for i in test) >= opts.min_test_words
            and any(letters[i] == c for i in train)
        }
    )
    if not candidates:
        raise SaelabError(
            "no letter has enough test words for the absorption probes; raise --words or lower "
            "--min-test-words"
        )
    y_LN = torch.tensor([[float(c == letter) for letter in letters] for c in candidates])
    # Each letter is rare against the rest: classes weigh equally, or the probes never say yes.
    probe = fit_logistic(
        x_ND[tr][None], y_LN[:, tr], l2=1e-2, balanced=True, per_feature_scale=False
    )
    pred_LN = probe.logits(x_ND[te][None]) > 0
    f1 = f1_score(pred_LN, y_LN[:, te])
    keep = (f1 >= opts.min_probe_f1).nonzero().flatten()
    if len(keep) == 0:
        raise SaelabError(
            f"no letter probe reached test F1 {opts.min_probe_f1} at this hook (best "
            f"{float(f1.max()):.2f}); use a hook where the model knows spelling, or lower "
            "--min-probe-f1"
        )
    return LetterProbes(
        [candidates[i] for i in keep.tolist()],
        probe.direction()[keep],
        pred_LN[keep],
        f1[keep],
    )


def main_latents(
    f_NF: Tensor,
    letters: list[str],
    train: list[int],
    test: list[int],
    probes: LetterProbes,
    opts: AbsorptionConfig,
) -> list[list[int]]:
    """Per letter of ``probes``: its main latents by k-sparse probing (see the module)."""
    from saelab.evaluation.bench.common import f1_score, fit_logistic

    tr, te = torch.tensor(train), torch.tensor(test)
    y_LN = torch.tensor([[float(c == letter) for letter in letters] for c in probes.letters])
    pos = y_LN[:, tr] > 0.5
    f_tr = f_NF[tr]
    sums = pos.double() @ f_tr.double()
    diff_LF = (sums / pos.sum(1, keepdim=True)) - (
        (f_tr.double().sum(0) - sums) / (~pos).sum(1, keepdim=True)
    )
    k_max = min(opts.max_k, f_NF.shape[1])
    order_LK = torch.topk(diff_LF.abs(), k_max, dim=1).indices
    f1_by_k = []
    for k in range(1, k_max + 1):
        idx = order_LK[:, :k]
        probe = fit_logistic(f_tr[:, idx].transpose(0, 1), y_LN[:, tr])
        logits = probe.logits(f_NF[te][:, idx].transpose(0, 1))
        f1_by_k.append(f1_score(logits > 0, y_LN[:, te]))
    chosen = []
    for letter in range(len(probes.letters)):
        k = 1
        while (
            k < k_max and float(f1_by_k[k][letter]) > float(f1_by_k[k - 1][letter]) + opts.f1_jump
        ):
            k += 1
        chosen.append(order_LK[letter, :k].tolist())
    return chosen


def absorption_scores(
    x_ND: Tensor,
    f_NF: Tensor,
    letters: list[str],
    train: list[int],
    test: list[int],
    probes: LetterProbes,
    W_dec_FD: Tensor,
    b_dec_D: Tensor,
    opts: AbsorptionConfig,
) -> dict[str, dict[str, Any]]:
    """Per letter: ``rate`` (full absorption), ``fraction``, ``true_positives``,
    ``main_latents``, ``probe_f1``. ``W_dec_FD`` and ``b_dec_D`` in the activation's units
    (a latent ``i`` adds ``f_i · W_dec[i]`` to the reconstruction)."""
    mains = main_latents(f_NF, letters, train, test, probes, opts)
    te = torch.tensor(test)
    x_te, f_te = x_ND[te].double(), f_NF[te].double()
    W = W_dec_FD.double()
    row_norm = W.norm(dim=1).clamp_min(1e-12)
    out: dict[str, dict[str, Any]] = {}
    for li, letter in enumerate(probes.letters):
        u = probes.direction_LD[li].double()
        cos_F = (W @ u) / row_norm
        contrib_NF = f_te * (W @ u)[None]  # each latent's projection onto u
        p_N = (x_te - b_dec_D.double()) @ u
        main = torch.tensor(mains[li])
        is_tp = probes.test_pred_LN[li] & torch.tensor([letters[i] == letter for i in test])
        absorbed = fractions = 0.0
        for n in is_tp.nonzero().flatten().tolist():
            p = float(p_N[n])
            others = contrib_NF[n].clone()
            others[main] = -torch.inf
            top = int(torch.argmax(others))
            silent = bool((f_te[n, main] < EPS).all())
            if (
                silent
                and p > 0
                and float(cos_F[top]) >= opts.cos_threshold
                and float(contrib_NF[n, top]) / p >= opts.projection_threshold
            ):
                absorbed += 1
            fractions += _absorption_fraction(
                p, float(contrib_NF[n, main].sum()), others, cos_F, opts
            )
        n_tp = int(is_tp.sum())
        out[letter] = {
            "rate": absorbed / n_tp if n_tp else float("nan"),
            "fraction": fractions / n_tp if n_tp else float("nan"),
            "true_positives": n_tp,
            "main_latents": mains[li],
            "probe_f1": float(probes.f1_L[li]),
        }
    return out


def _absorption_fraction(
    p: float, main_proj: float, others_F: Tensor, cos_F: Tensor, opts: AbsorptionConfig
) -> float:
    """The share of the probe projection ``p`` carried by up to three aligned non-main latents
    instead of the main ones (SAEBench's absorption fraction)."""
    if p <= 0:
        return 0.0
    mask = (cos_F >= opts.fraction_cos_threshold) & (others_F > 0)
    top = torch.topk(others_F[mask], min(3, int(mask.sum()))).values if mask.any() else None
    absorbing = float(top.sum()) if top is not None else 0.0
    if main_proj >= p or absorbing / p < opts.projection_threshold:
        return 0.0
    if main_proj <= 0:
        return 1.0
    carried = min(absorbing, p - main_proj)
    return min(max(carried / (carried + main_proj), 0.0), 1.0)


def split_words(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``range(n)`` into train and test indices."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_test = max(1, round(n * test_fraction))
    return sorted(idx[n_test:]), sorted(idx[:n_test])


def summarise_letters(per_letter: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The metrics of one SAE: means over the letters scored."""
    scored = [v for v in per_letter.values() if v["true_positives"] > 0]
    n = len(scored)

    def mean(key: str) -> float:
        return sum(v[key] for v in scored) / n if n else float("nan")

    return {
        "absorption_rate": mean("rate"),
        "absorption_fraction": mean("fraction"),
        "absorption_main_latents": (
            sum(len(v["main_latents"]) for v in scored) / n if n else float("nan")
        ),
        "absorption_letters": float(n),
    }


# ----- the suite --------------------------------------------------------------------------------


def run_absorption(
    sae_dirs: list[Path], opts: AbsorptionConfig | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """First-letter absorption of each SAE: ``{"suite": "absorption", "saes": {dir:
    {"metrics", "info", "details": {letter: {...}}}}}``. Prompts are run once per model for
    all hooks; probes are fitted once per hook."""
    from saelab.evaluation.bench.passes import (
        check_reachable,
        load_saes,
        model_name_of,
        sequence_features,
    )
    from saelab.evaluation.bench.words import sample_words, word_tokens
    from saelab.models.loading import load_model

    opts = opts or AbsorptionConfig()
    loaded = load_saes(sae_dirs, device=opts.device)
    by_model: dict[str, list] = {}
    for item in loaded:
        by_model.setdefault(model_name_of(item, opts.model_name), []).append(item)
    saes: dict[str, Any] = {}
    for name, members in by_model.items():
        model, tokenizer = load_model(name, device=opts.device)
        check_reachable(model, members, name)
        words = word_tokens(tokenizer)
        chosen = sample_words(words, opts.words, opts.seed)
        sequences, positions = build_prompts(tokenizer, words, chosen, opts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        acts, feats = sequence_features(
            model,
            sequences,
            members,
            positions=positions,
            pad_id=pad,
            batch_size=opts.batch_size,
            progress=progress,
            desc="absorption prompts",
        )
        letters = [w[0] for w in chosen]
        train, test = split_words(len(chosen), opts.test_fraction, opts.seed)
        probes = {h: fit_letter_probes(x, letters, train, test, opts) for h, x in acts.items()}
        for item, f_NF in zip(members, feats, strict=True):
            sae = item.sae
            scale = float(sae.activation_scale)
            per_letter = absorption_scores(
                acts[item.hook],
                f_NF,
                letters,
                train,
                test,
                probes[item.hook],
                sae.W_dec.detach().float().cpu() / scale,
                sae.b_dec.detach().float().cpu() / scale,
                opts,
            )
            saes[item.key] = {
                "metrics": summarise_letters(per_letter),
                "info": item.info,
                "details": per_letter,
            }
    return {"suite": "absorption", "saes": {item.key: saes[item.key] for item in loaded}}


register_suite(
    Suite(
        name="absorption",
        help="first-letter feature absorption (Chanin et al. 2024): mean and per letter",
        options=AbsorptionConfig,
        needs_sae_dirs=True,
        run=run_absorption,
    )
)
