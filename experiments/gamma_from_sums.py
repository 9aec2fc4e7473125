"""γ from tracked quantities: for every architecture, γ = Σ‖x̂‖² / Σ x·x̂ (the global sums the
trainer and ``saelab eval`` keep, ``saes/metrics.py``) equals γ fitted directly, the minimiser of
Σ‖x̂/γ − x‖² found by a golden-section search on the same activations; and γ's trend with the
L1 coefficient of ReLU SAEs over seeds.

Founding note: "you can compute γ from quantities that are usually tracked in SAE training …
(it's just minimizing a quadratic)". γ < 1 is shrinkage (reconstructions too short).

    python experiments/gamma_from_sums.py --quick     # synthetic data, seconds
    python experiments/gamma_from_sums.py             # the default model, layer 6
"""

from __future__ import annotations

import math

import torch

from common import (
    ACTIVATION_CACHE,
    DEFAULT_HOOK,
    Pool,
    PoolStream,
    collect,
    figure,
    finish,
    fmt,
    load,
    mean_ci,
    panel,
    parser,
    setup,
    train,
)
from saelab.config import SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes import ARCHITECTURES
from saelab.saes.metrics import ReconstructionStats
from saelab.saes.registry import architecture_class

NAME = "gamma_from_sums"
CLAIM = "γ computed from the trainer's global sums equals γ fitted directly (a 1-D quadratic)"
TRANSCODER_IN, TRANSCODER_OUT = "blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"
L1_COEFFICIENTS = (1.0, 3.0, 10.0)


def fitted_gamma(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """argmin_γ Σ‖x̂/γ − x‖², by golden-section search on log γ in [−5, 5] (no closed form)."""
    x, r = x_ND.double(), recon_ND.double()

    def loss(log_g: float) -> float:
        return float((r / math.exp(log_g) - x).pow(2).sum())

    lo, hi = -5.0, 5.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(200):
        if hi - lo < 1e-13:
            break
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


@torch.no_grad()
def gammas(sae, x_raw: torch.Tensor, target_raw: torch.Tensor) -> dict[str, float]:
    """γ from ReconstructionStats' sums and γ fitted, on the same rows (model units)."""
    pred = sae(x_raw)
    feats = sae.encode_normalised(x_raw * sae.activation_scale)
    stats = ReconstructionStats(target_raw.shape[1], sae.d_sae)
    for start in range(0, x_raw.shape[0], 1024):  # in batches, as training and eval add them
        sl = slice(start, start + 1024)
        part = sae.encode_normalised(x_raw[sl] * sae.activation_scale)
        stats.update(target_raw[sl], pred[sl], part.l0_per_token(), part.fired_counts())
    from_sums = stats.compute()["gamma"]
    fitted = fitted_gamma(target_raw, pred)
    return {
        "gamma_sums": from_sums,
        "gamma_fitted": fitted,
        "rel_diff": abs(from_sums - fitted) / fitted,
        "l0": float(feats.l0_per_token().double().mean()),
        "fvu": stats.compute()["fvu"],
    }


def synthetic_pool(n: int, seed: int = 0) -> Pool:
    """Sparse sums of 4 of 256 unit directions in R^32; the transcoder target a fixed linear
    map of them."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=1)
    idx = torch.randint(0, 256, (n, 4), generator=g)
    x = (torch.rand(n, 4, generator=g)[..., None] * 3 * dirs[idx]).sum(1)
    y = x @ torch.randn(32, 32, generator=g) / math.sqrt(32)
    acts = {DEFAULT_HOOK: x, TRANSCODER_IN: x, TRANSCODER_OUT: y}
    scales = {}
    for hook, a in acts.items():
        scales[hook] = math.sqrt(a.shape[1]) / float(a.norm(dim=1).mean())
        acts[hook] = a * scales[hook]
    return Pool(acts, scales, torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))


def sae_config(arch: str, expansion: int, **extra) -> SAEConfig:
    cls = architecture_class(arch)
    if cls.is_transcoder:
        return SAEConfig(
            hook=TRANSCODER_IN,
            output_hook=TRANSCODER_OUT,
            architecture=arch,
            expansion=expansion,
            k=16,
            **extra,
        )
    return SAEConfig(hook=DEFAULT_HOOK, architecture=arch, expansion=expansion, k=16, **extra)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, NAME)
    p.add_argument("--tokens", type=int, default=8192, help="training tokens (full mode)")
    p.add_argument("--heldout", type=int, default=4096, help="held-out tokens γ is measured on")
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    out = setup(args, NAME)
    if args.quick:
        args.tokens, args.heldout, args.expansion, args.batch_size = 2048, 512, 2, 256
        pool = synthetic_pool(args.tokens + args.heldout)
    else:
        model, tokenizer, _ = load(args)
        hooks = [DEFAULT_HOOK, TRANSCODER_IN, TRANSCODER_OUT]
        pool = collect(
            model, tokenizer, hooks, args.tokens + args.heldout, seed=0, cache=ACTIVATION_CACHE
        )
        del model
    train_pool, held = pool.split(args.tokens)
    raw = {h: a / pool.scales[h] for h, a in held.acts.items()}
    steps = train_pool.n // args.batch_size
    train_cfg = TrainConfig(
        tokens=steps * args.batch_size, batch_size=args.batch_size, log_every_steps=max(1, steps)
    )

    # 1. Every architecture: γ from sums against γ fitted.
    per_arch, skipped, saes, names = {}, {}, [], []
    for i, arch in enumerate(ARCHITECTURES):
        try:
            cfg = sae_config(arch, args.expansion)
            cls = architecture_class(arch)
            widths = {"d_out": pool.acts[TRANSCODER_OUT].shape[1]} if cls.is_transcoder else {}
            saes.append(cls(cfg, pool.acts[cfg.hook].shape[1], seed=i, **widths))
            names.append(arch)
        except (SaelabError, TypeError, ValueError) as exc:
            skipped[arch] = str(exc).splitlines()[0][:200]
    train(saes, train_cfg, PoolStream(train_pool, args.batch_size, seed=0))
    for arch, sae in zip(names, saes, strict=True):
        target = raw[sae.cfg.output_hook or sae.cfg.hook]
        per_arch[arch] = gammas(sae.eval(), raw[sae.cfg.hook], target)
    worst = max(r["rel_diff"] for r in per_arch.values())
    if args.quick:
        assert worst < 1e-6, f"γ from sums and γ fitted differ by {worst:.3g}"
        assert len(per_arch) >= 8, f"only {sorted(per_arch)} could be built"

    # 2. γ against the L1 coefficient (ReLU), over seeds.
    trend = {str(c): [] for c in L1_COEFFICIENTS}
    slopes = []
    for seed in range(args.seeds):
        relus = [
            architecture_class("relu")(
                sae_config("relu", args.expansion, l1_coefficient=c),
                pool.acts[DEFAULT_HOOK].shape[1],
                seed=100 + seed,
            )
            for c in L1_COEFFICIENTS
        ]
        relu_pool = Pool(
            {DEFAULT_HOOK: train_pool.acts[DEFAULT_HOOK]},
            train_pool.scales,
            train_pool.positions,
            train_pool.token_ids,
        )
        train(relus, train_cfg, PoolStream(relu_pool, args.batch_size, seed=seed + 1))
        values = []
        for c, sae in zip(L1_COEFFICIENTS, relus, strict=True):
            g = gammas(sae.eval(), raw[DEFAULT_HOOK], raw[DEFAULT_HOOK])
            trend[str(c)].append(g)
            values.append(g["gamma_sums"])
        xs = [math.log10(c) for c in L1_COEFFICIENTS]
        mx, my = sum(xs) / len(xs), sum(values) / len(values)
        slopes.append(
            sum((x - mx) * (y - my) for x, y in zip(xs, values, strict=True))
            / sum((x - mx) ** 2 for x in xs)
        )
    slope = mean_ci(slopes)
    by_l1 = {
        c: {
            "gamma": mean_ci([r["gamma_sums"] for r in rows]),
            "l0": mean_ci([r["l0"] for r in rows]),
            "fvu": mean_ci([r["fvu"] for r in rows]),
        }
        for c, rows in trend.items()
    }
    beyond = abs(slope["mean"]) > slope["ci95"]
    direction = "falls" if slope["mean"] < 0 else "rises"
    verdict = (
        f"γ from the sums equals γ fitted for all {len(per_arch)} architectures built (largest "
        f"relative difference {worst:.1e}); ReLU γ {direction} with the L1 coefficient, slope "
        f"{fmt(slope)} per decade of L1 over {args.seeds} seeds: "
        + ("larger than the seed noise" if beyond else "not distinguishable from seed noise")
    )

    fig, (ax1, ax2) = figure(2)
    archs = list(per_arch)
    ax1.bar(range(len(archs)), [per_arch[a]["gamma_sums"] for a in archs], label="from sums")
    ax1.plot(range(len(archs)), [per_arch[a]["gamma_fitted"] for a in archs], "k_", ms=14,
             label="fitted")  # fmt: skip
    ax1.set_xticks(range(len(archs)), archs, rotation=60, ha="right", fontsize=7)
    ax1.axhline(1, color="grey", lw=0.5)
    panel(ax1, None, "γ", "γ per architecture")
    xs = list(L1_COEFFICIENTS)
    for seed in range(args.seeds):
        ax2.plot(xs, [trend[str(c)][seed]["gamma_sums"] for c in xs], "o-", alpha=0.6,
                 label=f"seed {seed}")  # fmt: skip
    ax2.set_xscale("log")
    panel(ax2, "L1 coefficient", "γ (ReLU)", "γ against the L1 coefficient")
    return finish(
        args,
        out,
        NAME,
        claim=CLAIM,
        sizes={
            "data": "synthetic" if args.quick else f"default model, {DEFAULT_HOOK}",
            "train_tokens": train_pool.n,
            "heldout_tokens": held.n,
            "expansion": args.expansion,
            "batch_size": args.batch_size,
            "steps": steps,
        },
        numbers={
            "per_architecture": per_arch,
            "skipped": skipped,
            "max_rel_diff": worst,
            "l1_coefficients": list(L1_COEFFICIENTS),
            "by_l1": by_l1,
            "slope_per_decade": slope,
            "slope_exceeds_seed_noise": beyond,
        },
        verdict=verdict,
        fig=fig,
    )


if __name__ == "__main__":
    main()
