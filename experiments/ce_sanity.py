"""CE-loss sanity: the default model's next-token CE by context length (32 … 1024) and by
position, on the default text and on a shuffled-token control, and which of ``saelab eval``'s
sanity warnings (``evaluation/sanity.py``) fire on deliberately broken set-ups.

Founding note: "Why is CE loss ≥ 5.0 everywhere? … GELU-1L over 128 positions gets 4.3 … Are you
using a very small sequence length, or an odd dataset?"

A causal model's prediction at position t depends only on tokens ≤ t, so the CE of a context-L
row is the mean over its first L − 1 positions of a longer row with the same start: one pass of
rows of the longest context gives the CE at every shorter one (``--quick`` asserts this
identity against rows of length L).

    python experiments/ce_sanity.py --quick
    python experiments/ce_sanity.py            # default model, 3 seeds
"""

from __future__ import annotations

import math

import torch

from common import (
    collect,
    figure,
    finish,
    fmt,
    hook_for,
    load,
    mean_ci,
    panel,
    parser,
    quick_text,
    setup,
    text_file,
    topk_sae,
)
from saelab.data.activations import special_token_ids, token_mask
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import evaluate_saes
from saelab.evaluation.splice import next_token_ce

NAME = "ce_sanity"
CLAIM = "a CE ≥ 5 nats everywhere points at a short context or odd data, not at the model"
CONTEXTS = (32, 64, 128, 256, 512, 1024)


@torch.no_grad()
def position_ce(model, tokens_NP: torch.Tensor, specials: list[int]) -> torch.Tensor:
    """``[N, P]`` CE of predicting token t+1 at position t; NaN where not scored (BOS position,
    the last position, special tokens)."""
    ce_NP = next_token_ce(model(tokens_NP, use_cache=False).logits, tokens_NP)
    scored_NP = token_mask(tokens_NP, 1, specials)
    scored_NP[:, -1] = False
    return torch.where(scored_NP, ce_NP, torch.nan)


def ce_at_context(ce_NP: torch.Tensor, context: int) -> float:
    """Mean CE of rows cut to ``context`` tokens: positions 1 … context − 2 (see the doc)."""
    part = ce_NP[:, 1 : context - 1]
    return float(part[~part.isnan()].mean())


def shuffled(tokens_NP: torch.Tensor, seed: int) -> torch.Tensor:
    """Each row's tokens after BOS in a random order (the control: no usable context)."""
    g = torch.Generator().manual_seed(seed)
    out = tokens_NP.clone()
    for row in out:
        row[1:] = row[1:][torch.randperm(row.shape[0] - 1, generator=g)]
    return out


def permuted_text(tokenizer, dataset: str, tokens: int, seed: int = 0) -> list[str]:
    """Default text whose token ids went through a fixed random permutation of the vocabulary:
    what another tokenizer's ids look like to this model."""
    vocab = len(tokenizer)
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
    lines, count = [], 0
    for tokens_NP in TokenBatches(dataset, tokenizer, context=128, batch_size=4, seed=seed):
        for row in tokens_NP:
            lines.append(tokenizer.decode(perm[row[1:]].tolist()).replace("\n", " "))
            count += row.shape[0]
        if count >= tokens:
            break
    return lines


class NoBOS:
    """A tokenizer that starts rows with an ordinary token instead of BOS (``first``) and
    declares no other special token: text fed to a model that was trained with BOS, without
    it."""

    def __init__(self, tokenizer, first: int) -> None:
        self._tokenizer = tokenizer
        self.bos_token_id, self.eos_token_id, self.pad_token_id = first, None, None

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)


def warnings_of(setups: dict, model, tokenizer, sae, tokens: int) -> dict[str, dict]:
    """Each set-up through ``evaluate_saes``: its clean CE, reference CE and warnings."""
    found = {}
    for label, kw in setups.items():
        kw = dict(kw)
        expected = kw.pop("expected_norm", None)
        tok = kw.pop("tokenizer", tokenizer)
        try:
            ((metrics, info),) = evaluate_saes(
                [sae],
                model,
                tok,
                tokens=tokens,
                batch_size=4,
                progress=False,
                expected_norms=None if expected is None else [expected],
                **kw,
            )
        except SaelabError as exc:  # a refusal is also a check that fired
            found[label] = {"error": str(exc), "warnings": [f"error: {exc}"]}
            continue
        found[label] = {
            "ce_clean": metrics["ce_loss_clean"],
            "reference_ce": info["reference_ce"],
            "position0_masked": info["position0_masked"],
            "mean_input_norm": info["mean_input_norm"],
            "warnings": info["warnings"],
        }
    return found


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, NAME)
    p.add_argument("--rows", type=int, default=1, help="rows of the longest context per seed")
    p.add_argument("--eval-tokens", type=int, default=128, help="tokens per broken set-up")
    args = p.parse_args(argv)
    out = setup(args, NAME)
    model, tokenizer, _ = load(args)
    specials = special_token_ids(tokenizer)
    dataset = quick_text(out) if args.quick else "default"
    contexts = (8, 16, 32, 64) if args.quick else CONTEXTS
    longest = contexts[-1]

    by_context = {"text": {c: [] for c in contexts}, "shuffled": {c: [] for c in contexts}}
    by_position = {"text": [], "shuffled": []}
    for seed in range(args.seeds):
        rows = next(iter(TokenBatches(dataset, tokenizer, context=longest,
                                      batch_size=args.rows, seed=seed)))  # fmt: skip
        for kind, tokens_NP in (("text", rows), ("shuffled", shuffled(rows, seed))):
            ce_NP = position_ce(model, tokens_NP, specials)
            by_position[kind].append(ce_NP.nanmean(0))
            for c in contexts:
                by_context[kind][c].append(ce_at_context(ce_NP, c))
            if args.quick and kind == "text":
                # The identity the single pass rests on: rows cut to L tokens score the same.
                for c in contexts[:-1]:
                    direct = position_ce(model, tokens_NP[:, :c], specials)
                    assert torch.allclose(
                        direct[:, 1 : c - 1], ce_NP[:, 1 : c - 1], atol=1e-4, equal_nan=True
                    ), f"CE at context {c} is not the prefix of the longest rows' CE"
    stats = {k: {str(c): mean_ci(v) for c, v in d.items()} for k, d in by_context.items()}

    # Sanity warnings on broken set-ups, with an SAE (untrained: the warnings are about the
    # set-up, not the SAE) whose scale is that of the data.
    pool = collect(model, tokenizer, [hook_for(args)], 256, dataset=dataset)
    hook = next(iter(pool.acts))
    sae = topk_sae(hook, pool, 2, 8, seed=0)
    sae.activation_scale.fill_(pool.scales[hook])
    true_norm = math.sqrt(sae.d_in) / pool.scales[hook]
    permuted = text_file(out, "permuted_vocab.txt", permuted_text(tokenizer, dataset, 2048))
    eval_context = 32 if args.quick else 128
    first_word = tokenizer(" The", add_special_tokens=False)["input_ids"][0]
    setups = {
        "correct": {"dataset": dataset, "context": eval_context},
        "BOS scored (skip_positions=0)": {
            "dataset": dataset, "context": eval_context, "skip_positions": 0,
        },
        "no BOS (rows start with a word, skip_positions=0)": {
            "dataset": dataset, "context": eval_context, "skip_positions": 0,
            "tokenizer": NoBOS(tokenizer, first_word),
        },
        "short context (8)": {"dataset": dataset, "context": 8},
        "tokenizer mismatch (permuted ids)": {"dataset": str(permuted), "context": eval_context},
        "SAE of another layer (norm 5x off)": {
            "dataset": dataset, "context": eval_context, "expected_norm": 5 * true_norm,
        },
    }  # fmt: skip
    if args.quick:
        args.eval_tokens = 64
    found = warnings_of(setups, model, tokenizer, sae, args.eval_tokens)
    fired = {label: bool(v["warnings"]) for label, v in found.items()}
    if args.quick:
        norm_off = found["SAE of another layer (norm 5x off)"]["warnings"]
        assert any("mean norm" in w for w in norm_off)
        assert not any("position 0" in w for w in found["correct"]["warnings"])

    c128 = stats["text"][str(128 if not args.quick else 32)]
    first, last = stats["text"][str(contexts[0])], stats["text"][str(longest)]
    shuf = stats["shuffled"][str(longest)]
    drop = [a - b for a, b in zip(first["values"], last["values"], strict=True)]
    drop_ci = mean_ci(drop)
    verdict = (
        f"default-text CE {fmt(c128)} nats at context 128, {fmt(first)} at {contexts[0]} and "
        f"{fmt(last)} at {longest} (drop {fmt(drop_ci)}, "
        + (
            "larger than the seed noise"
            if abs(drop_ci["mean"]) > drop_ci["ci95"]
            else "within the seed noise"
        )  # fmt: skip
        + f"); shuffled tokens {fmt(shuf)}. Warnings fire for: "
        + ", ".join(k for k, v in fired.items() if v)
        + "; silent for: "
        + ", ".join(k for k, v in fired.items() if not v)
    )

    fig, (ax1, ax2) = figure(2)
    for kind, style in (("text", "o-"), ("shuffled", "s--")):
        means = [stats[kind][str(c)]["mean"] for c in contexts]
        cis = [stats[kind][str(c)]["ci95"] for c in contexts]
        ax1.errorbar(contexts, means, yerr=cis, fmt=style, capsize=3, label=kind)
        curve = torch.stack(by_position[kind]).nanmean(0)
        ax2.plot(range(curve.shape[0]), curve.tolist(), lw=0.6, label=kind)
    ax1.axhline(4.3, color="grey", ls=":", label="GELU-1L at 128 (note)")
    ax1.set_xscale("log", base=2)
    panel(ax1, "context length", "CE (nats)", "CE by context length")
    ax2.set_xscale("log")
    panel(ax2, "position", "CE (nats), mean over seeds", "CE by position")
    return finish(
        args,
        out,
        NAME,
        claim=CLAIM,
        sizes={
            "rows_per_seed": args.rows,
            "longest_context": longest,
            "eval_tokens_per_setup": args.eval_tokens,
            "eval_context": eval_context,
            "sae": f"untrained TopK x2 k8 at {hook}, scale from {pool.n} tokens",
        },
        numbers={
            "ce_by_context": stats,
            "ce_drop_first_to_longest": drop_ci,
            "ce_by_position": {k: torch.stack(v).nanmean(0) for k, v in by_position.items()},
            "setups": found,
            "warning_fired": fired,
        },
        verdict=verdict,
        fig=fig,
    )


if __name__ == "__main__":
    main()
