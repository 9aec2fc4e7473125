"""``saelab eval``'s cost beside a plain implementation's three full forward passes, in one run.

On the same token batches of the default text:

* **plain**: per SAE, three full forward passes (clean, spliced, zero-ablated), each with its
  whole ``[N, P, vocab]`` logits, CE and KL on those
  (:func:`~saelab.evaluation.splice.splice_batch`, the reference the fast path is tested
  against);
* **saelab**: :func:`~saelab.evaluation.evaluate.evaluate_saes` for N = 1, 2, 4 SAEs on one hook
  (one clean pass; each variant from the hook on; chunked LM head, CE and KL), the reference CE
  left out (it is measured once per model and context, then read from a cache);
* its parts: the **prefix** (the blocks up to the hook, stopped there) and one **suffix** (the
  blocks after the hook, the LM head and the chunked losses of one variant), so the measured
  cost can be set beside ``prefix + (1 + N_SAE + N_hooks) × suffix``.

Prints one JSON line per measurement, seconds per 1k model tokens. Random TopK SAEs (width and k
as the demo's) stand in for trained ones: the cost does not depend on the weights.

Example::

    python benchmarks/eval_speed.py                       # default model, 1024 tokens, ~minutes
    python benchmarks/eval_speed.py --tokens 2048 --saes 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _model_bench import default_batches, load, parser
from saelab.config import SAEConfig
from saelab.data.activations import special_token_ids, token_mask
from saelab.evaluation.evaluate import evaluate_saes
from saelab.evaluation.splice import (
    SpliceSums,
    head_losses,
    scored_positions,
    splice_batch,
)
from saelab.models.hookpoints import hook_dim, residual_entry
from saelab.models.intervene import run_blocks_from, run_to_hooks
from saelab.saes import TopKSAE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=1024, help="model tokens per measurement")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--saes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    return p.parse_args(argv)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load(args)
    d_in = hook_dim(model, args.hook)
    saes = [
        TopKSAE(SAEConfig(hook=args.hook, k=args.k, expansion=args.expansion), d_in, seed=i)
        for i in range(max(args.saes))
    ]
    n_batches = max(1, args.tokens // (args.batch_size * args.context))
    batches = default_batches(
        tokenizer, n_batches, context=args.context, batch_size=args.batch_size, seed=1
    )
    tokens = n_batches * args.batch_size * args.context
    per_1k = 1000 / tokens
    specials = special_token_ids(tokenizer)
    start, direct = residual_entry(model, args.hook)

    def report(what: str, seconds: float, **extra) -> None:
        line = {"what": what, "s_per_1k_tokens": round(seconds * per_1k, 3), **extra}
        print(json.dumps({**line, "tokens": tokens, "threads": args.threads}), flush=True)

    @torch.no_grad()
    def plain() -> None:
        sums = SpliceSums()
        for tokens_NP in batches:
            keep_NP = token_mask(tokens_NP, 1, specials)
            splice_batch(model, args.hook, tokens_NP, keep_NP, saes[0], sums)

    @torch.no_grad()
    def prefix() -> None:
        for tokens_NP in batches:
            run_to_hooks(model, tokens_NP, [args.hook])

    @torch.no_grad()
    def suffix() -> None:
        for tokens_NP, residual in zip(batches, residuals, strict=True):
            keep_NP = token_mask(tokens_NP, 1, specials)
            hidden = run_blocks_from(model, tokens_NP, start, residual)
            head_losses(model, hidden, [], tokens_NP, scored_positions(keep_NP))

    def saelab(n: int) -> None:
        evaluate_saes(
            saes[:n],
            model,
            tokenizer,
            tokens=tokens,
            context=args.context,
            batch_size=args.batch_size,
            progress=False,
            check_reference=False,
        )

    residuals = [run_to_hooks(model, b, [args.hook])[args.hook] for b in batches]
    if not direct:
        raise SystemExit(f"use a residual hook (hook_resid_post/pre), not {args.hook}")
    saelab(1)  # warm-up: first calls allocate and pick kernels
    plain_s = timed(plain)
    report("plain: 3 full forwards per SAE", plain_s, saes=1)
    prefix_s, suffix_s = timed(prefix), timed(suffix)
    report("prefix (blocks up to the hook)", prefix_s)
    report("suffix (blocks after it, LM head, chunked CE/KL)", suffix_s)
    for n in args.saes:
        measured = timed(lambda n=n: saelab(n))
        predicted = prefix_s + (1 + n + 1) * suffix_s
        report(
            "saelab eval",
            measured,
            saes=n,
            predicted_s_per_1k=round(predicted * per_1k, 3),
            measured_over_predicted=round(measured / predicted, 3),
            plain_over_saelab=round(n * plain_s / measured, 3),
        )


if __name__ == "__main__":
    main()
