"""``saelab features`` speed: tokens/s and peak memory beside the bound, a bare forward to the hook.

For each ``--tokens`` size two fresh subprocesses run on the same text and tokens: the bound (the
model's forward up to the SAE's hook over the same ``[batch, context]`` token batches, nothing
else) and :func:`~saelab.analysis.features.collect.compute_feature_stats` (forward, SAE encode,
running statistics, logit effects). Each reports its wall time and its peak resident memory
(``ru_maxrss``), so the memory of the statistics is the difference of the two. Prints one JSON
line per size and the ratio ``features tokens/s ÷ bound tokens/s`` (1.0 = as fast as the model
alone).

With ``--profile`` the features pass is timed by phase (forward, encode, statistics) on the
smallest size.

Example::

    python benchmarks/features_speed.py --tokens 20000,100000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEMO_SAE = "runs/demo/blocks.6.hook_resid_post-topk-x16-k32"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from saelab.analysis.features.collect import compute_feature_stats
    from saelab.data.text import TokenBatches
    from saelab.models.intervene import run_to_hooks
    from saelab.models.loading import load_model
    from saelab.saes.storage import load_sae

    sae = load_sae(args.sae)
    model, tokenizer = load_model(str(sae.metadata.get("model_name") or "default"))
    base_mib = _peak_mib()
    started = time.perf_counter()
    if args.child == "bound":
        batches = TokenBatches("default", tokenizer, context=128, batch_size=16, seed=0)
        n_seq, done = -(-args.tokens // 128), 0
        with torch.no_grad():
            while done < n_seq:
                tokens_NP = next(batches)[: n_seq - done]
                run_to_hooks(model, tokens_NP, [sae.cfg.hook])
                done += len(tokens_NP)
    else:
        compute_feature_stats(sae, model, tokenizer, tokens=args.tokens, progress=False)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {"seconds": seconds, "peak_mib": _peak_mib(), "after_load_mib": base_mib},
        )
    )


def profile(args: argparse.Namespace) -> None:
    """Wall time per phase of one features pass (forward, encode, statistics, rest)."""
    import torch

    torch.set_num_threads(args.threads)
    from saelab.analysis.features import collect, running
    from saelab.models.loading import load_model
    from saelab.saes.storage import load_sae

    sae = load_sae(args.sae)
    model, tokenizer = load_model(str(sae.metadata.get("model_name") or "default"))
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    originals = {
        (collect, "run_to_hooks"): collect.run_to_hooks,
        (running._RunningStats, "update_"): running._RunningStats.update_,
        (type(sae), "encode"): type(sae).encode,
        (collect, "logit_effects_of"): collect.logit_effects_of,
    }
    names = {
        "run_to_hooks": "forward",
        "update_": "statistics",
        "encode": "encode",
        "logit_effects_of": "logit_effects",
    }
    for (owner, attr), fn in originals.items():
        setattr(owner, attr, timed(names[attr], fn))
    try:
        started = time.perf_counter()
        collect.compute_feature_stats(sae, model, tokenizer, tokens=args.tokens, progress=False)
        total = time.perf_counter() - started
    finally:
        for (owner, attr), fn in originals.items():
            setattr(owner, attr, fn)
    phases = {k: round(v, 2) for k, v in spent.items()}
    phases["other"] = round(total - sum(spent.values()), 2)
    print(json.dumps({"tokens": args.tokens, "total_s": round(total, 2), "phases_s": phases}))


def _run_child(kind: str, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--tokens", str(tokens)]
    cmd += ["--threads", str(args.threads), "--sae", args.sae]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} at {tokens} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", default=DEMO_SAE)
    p.add_argument("--tokens", default="20000,100000", help="comma-separated sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="time the phases at the first size")
    p.add_argument("--child", choices=["bound", "features"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.tokens = int(args.tokens)
        child(args)
        return
    sizes = [int(float(t)) for t in args.tokens.split(",")]
    if args.profile:
        args.tokens = sizes[0]
        profile(args)
        return
    for tokens in sizes:
        bound = _run_child("bound", tokens, args)
        feats = _run_child("features", tokens, args)
        print(
            json.dumps(
                {
                    "tokens": tokens,
                    "bound_tokens_per_s": round(tokens / bound["seconds"], 1),
                    "features_tokens_per_s": round(tokens / feats["seconds"], 1),
                    "ratio_vs_bound": round(bound["seconds"] / feats["seconds"], 3),
                    "bound_s": round(bound["seconds"], 1),
                    "features_s": round(feats["seconds"], 1),
                    "bound_peak_mib": round(bound["peak_mib"]),
                    "features_peak_mib": round(feats["peak_mib"]),
                    "extra_peak_mib": round(feats["peak_mib"] - bound["peak_mib"]),
                    "threads": args.threads,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
