"""LR warm-up right after each resample: ReLU-L1 SAEs with dead-feature resampling, with and
without the post-resample warm-up (``train.resample_lr_warmup_steps``: the LR drops to 0.1× and
returns along a cosine), otherwise identical (same data order, same initialisation); the loss
curve around each resample, final FVU, CE recovered and dead fraction, over seeds.

Founding note: "Do you apply LR warmup immediately after doing resampling (i.e. immediately
reducing the LR, and then slowly increasing it back to the normal value)? In my GELU-1L blog
post I found this pretty helpful".

``--quick`` asserts what holds by construction: both variants' loss curves are identical, bit
for bit, up to the first resample, and differ right after it.

    python experiments/resample_warmup.py --quick
    python experiments/resample_warmup.py
"""

from __future__ import annotations

import json

import torch

from common import (
    PoolStream,
    cache_for,
    collect,
    dataset_for,
    figure,
    finish,
    fmt,
    fvu_and_density,
    hook_for,
    load,
    paired,
    panel,
    parser,
    setup,
    train,
)
from saelab.config import SAEConfig, TrainConfig
from saelab.evaluation.evaluate import evaluate_saes
from saelab.saes import ReLUSAE
from saelab.saes.registry import sae_folder_name

NAME = "resample_warmup"
CLAIM = "an LR warm-up right after each resample helps (lower loss, fewer dead features)"
VARIANTS = ("no_warmup", "warmup")


def train_variant(args, pool, hook: str, seed: int, warmup: int, out) -> tuple[ReLUSAE, list]:
    cfg = SAEConfig(
        hook=hook,
        architecture="relu",
        expansion=args.expansion,
        l1_coefficient=args.l1,
        decoder_unit_norm=True,
        apply_b_dec_to_input=True,
    )
    torch.manual_seed(seed)
    sae = ReLUSAE(cfg, pool.acts[hook].shape[1], seed=seed)
    stream = PoolStream(pool, args.batch_size, seed=seed, epochs=args.epochs)
    steps = stream.steps()
    train_cfg = TrainConfig(
        tokens=steps * args.batch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_warmup_frac=0.05,
        log_every_steps=1,
        resample_every_steps=args.every,
        resample_until_frac=0.75,
        resample_sample_tokens=4 * args.batch_size,
        resample_lr_warmup_steps=warmup,
        resample_dead_window_tokens=args.dead_window,
    )
    train([sae], train_cfg, stream, out)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return sae.eval(), records


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, NAME)
    p.add_argument("--tokens", type=int, default=12_288, help="training tokens per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--heldout", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--l1", type=float, default=8.0, help="high, so that features die")
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--every", type=int, default=20, help="train.resample_every_steps")
    p.add_argument("--warmup", type=int, default=10, help="train.resample_lr_warmup_steps")
    p.add_argument("--eval-tokens", type=int, default=256, help="CE-recovered tokens")
    p.add_argument("--dead-window", type=int, default=None, help="resample_dead_window_tokens")
    args = p.parse_args(argv)
    out = setup(args, NAME)
    model, tokenizer, _ = load(args)
    hook = hook_for(args)
    if args.quick:
        args.tokens, args.heldout, args.epochs, args.batch_size = 1024, 256, 1, 16
        args.every, args.warmup, args.expansion, args.eval_tokens = 16, 4, 4, 64
        args.l1, args.dead_window = 50.0, 16  # silent for one batch counts as dead here
    pool = collect(
        model, tokenizer, [hook], args.tokens + args.heldout,
        dataset=dataset_for(args, out), seed=0, cache=cache_for(args),
    )  # fmt: skip
    train_pool, held = pool.split(args.tokens)
    rows = {v: [] for v in VARIANTS}
    curves = {v: [] for v in VARIANTS}
    saes = []
    for seed in range(args.seeds):
        for variant in VARIANTS:
            warmup = args.warmup if variant == "warmup" else 0
            folder = out / "runs" / f"{variant}-seed{seed}"
            sae, records = train_variant(args, train_pool, hook, seed, warmup, folder)
            steps = [r for r in records if "fvu" in r]
            # Steps at which features were resampled (the warm-up restarts only there).
            events = [
                r["step"] for r in records if r.get("event") == "resample" and r["n_resampled"] > 0
            ]
            resampled = sum(r["n_resampled"] for r in records if r.get("event") == "resample")
            curves[variant].append({"step": [r["step"] for r in steps],
                                    "fvu": [r["fvu"] for r in steps],
                                    "lr": [r.get("lr") for r in steps],
                                    "resamples": events})  # fmt: skip
            held_out = fvu_and_density(sae, held.acts[hook], pool.scales[hook])
            after = [
                r["fvu"] for r in steps if any(0 < r["step"] - e <= args.every // 2 for e in events)
            ]
            rows[variant].append({
                "fvu": held_out["fvu"],
                "l0": held_out["l0"],
                "dead_frac": float((held_out["density"] == 0).double().mean()),
                "features_resampled": resampled,
                "fvu_after_resamples": sum(after) / max(len(after), 1),
            })  # fmt: skip
            saes.append((variant, seed, sae))
    if args.quick:
        a, b = curves["no_warmup"][0], curves["warmup"][0]
        first = a["resamples"][0]
        before = [i for i, s in enumerate(a["step"]) if s <= first]
        assert [a["fvu"][i] for i in before] == [b["fvu"][i] for i in before], (
            "the variants differ before the first resample"
        )
        nxt = before[-1] + 1  # the first step after the resample: its LR is cut to 0.1×
        assert b["lr"][nxt] < 0.5 * a["lr"][nxt], "the warm-up did not lower the LR"
        assert a["fvu"][nxt + 1 :] != b["fvu"][nxt + 1 :], "no difference after the resample"
    results = evaluate_saes(
        [s for _, _, s in saes],
        model,
        tokenizer,
        dataset=dataset_for(args, out),
        tokens=args.eval_tokens,
        context=128 if not args.quick else 32,
        batch_size=4,
        progress=False,
        check_reference=False,
    )
    for (variant, seed, _), (metrics, _info) in zip(saes, results, strict=True):
        rows[variant][seed]["ce_loss_recovered"] = metrics["ce_loss_recovered"]

    comparisons = {
        key: paired(
            [r[key] for r in rows["warmup"]],
            [r[key] for r in rows["no_warmup"]],
            f"{key}: warm-up − no warm-up",
        )  # fmt: skip
        for key in ("fvu", "ce_loss_recovered", "dead_frac", "fvu_after_resamples", "l0")
    }
    parts = []
    for key in ("fvu", "ce_loss_recovered", "dead_frac", "fvu_after_resamples"):
        c = comparisons[key]
        parts.append(
            f"{key} {fmt(c['a'])} vs {fmt(c['b'])} (diff {fmt(c['difference'])}, "
            + ("beyond seed noise" if c["exceeds_seed_noise"] else "within seed noise")
            + ")"
        )
    better = (
        comparisons["fvu"]["exceeds_seed_noise"] and comparisons["fvu"]["difference"]["mean"] < 0
    )
    verdict = (
        ("confirmed: " if better else "not confirmed at this scale: ")
        + "warm-up vs none, "
        + "; ".join(parts)
    )

    fig, (ax1, ax2) = figure(2)
    for variant, colour in zip(VARIANTS, ("tab:red", "tab:blue"), strict=True):
        for i, curve in enumerate(curves[variant]):
            ax1.plot(curve["step"], curve["fvu"], color=colour, alpha=0.5, lw=0.8,
                     label=variant if i == 0 else None)  # fmt: skip
        ax2.plot(curves[variant][0]["step"], curves[variant][0]["lr"], color=colour, label=variant)
    for e in curves["warmup"][0]["resamples"]:
        ax1.axvline(e, color="grey", ls=":", lw=0.8)
        ax2.axvline(e, color="grey", ls=":", lw=0.8)
    ax1.set_yscale("log")
    panel(ax1, "step", "training FVU (one batch)", "loss around resamples (dotted)")
    panel(ax2, "step", "learning rate", "LR schedule (seed 0)")
    return finish(
        args,
        out,
        NAME,
        claim=CLAIM,
        sizes={
            "hook": hook,
            "train_tokens_per_epoch": train_pool.n,
            "epochs": args.epochs,
            "heldout_tokens": held.n,
            "batch_size": args.batch_size,
            "expansion": args.expansion,
            "l1_coefficient": args.l1,
            "lr": args.lr,
            "resample_every_steps": args.every,
            "resample_lr_warmup_steps": args.warmup,
            "ce_eval_tokens": args.eval_tokens,
            "sae_folder": sae_folder_name(saes[0][2].cfg),
        },
        numbers={"per_seed": rows, "comparisons": comparisons, "curves": curves},
        verdict=verdict,
        fig=fig,
    )


if __name__ == "__main__":
    main()
