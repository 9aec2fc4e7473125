"""SAEs and steering vectors transfer across layers: the transfer matrix of residual-stream SAEs
trained at three layers (each SAE, weights unchanged, on the residual stream of the other
layers: held-out FVU over seeds, and CE recovered from ``saelab transfer``'s
``transfer_matrix`` for seed 0), and the effect a CAA steering vector built at one layer retains
when added at other layers (``saelab steer --transfer-layers``'s ``layer_transfer``), over
bootstrap resamples of its contrast pairs.

Founding note: "I saw results at a Hackathon once that suggested you can train resid stream SAEs
on early layers and transfer them to some later layers, too"; steering vectors transfer.

Retained variance of SAE i at layer j = (1 − FVU_ij) / (1 − FVU_jj): the share of the variance
the SAE trained there explains that the moved SAE still explains.

``--quick`` asserts what holds by construction: a cell at the SAE's own layer equals its
ordinary FVU, and a vector moved to its own layer retains exactly 1.

    python experiments/layer_transfer.py --quick
    python experiments/layer_transfer.py
"""

from __future__ import annotations

import torch

from common import (
    EXPERIMENTS_DIR,
    cache_for,
    collect,
    dataset_for,
    figure,
    finish,
    fmt,
    load,
    mean_ci,
    panel,
    parser,
    setup,
    topk_sae,
    train_epochs,
)
from saelab.analysis.steering import caa_vector, layer_transfer, read_pairs
from saelab.evaluation.transfer import transfer_matrix

NAME = "layer_transfer"
CLAIM = "residual SAEs (and steering vectors) trained at one layer transfer to later layers"
EXAMPLES = EXPERIMENTS_DIR.parent / "examples"


@torch.no_grad()
def fvu(sae, raw_ND: torch.Tensor) -> float:
    recon = sae(raw_ND)
    return float((raw_ND - recon).pow(2).sum() / (raw_ND - raw_ND.mean(0)).pow(2).sum())


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, NAME)
    p.add_argument("--layers", default="2,6,10", help="layers the SAEs are trained at")
    p.add_argument("--steer-layers", default="2,4,6,8,10", help="layers the vector is moved to")
    p.add_argument("--vector-layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=6144)
    p.add_argument("--heldout", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--expansion", type=int, default=2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--ce-tokens", type=int, default=128, help="tokens per CE cell (seed 0)")
    p.add_argument("--coef", type=float, default=1.0)
    args = p.parse_args(argv)
    out = setup(args, NAME)
    model, tokenizer, _ = load(args)
    layers = [0, 1, 2] if args.quick else [int(x) for x in args.layers.split(",")]
    steer_layers = [0, 1, 2] if args.quick else [int(x) for x in args.steer_layers.split(",")]
    vector_layer = 1 if args.quick else args.vector_layer
    if args.quick:
        args.tokens, args.heldout, args.epochs, args.ce_tokens = 768, 256, 1, 32
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    dataset = dataset_for(args, out)
    pool = collect(model, tokenizer, hooks, args.tokens + args.heldout, dataset=dataset, seed=0,
                   cache=cache_for(args))  # fmt: skip
    train_pool, held = pool.split(args.tokens)
    raw = {h: held.acts[h] / pool.scales[h] for h in hooks}
    matrices, ce = [], None
    for seed in range(args.seeds):
        saes = [topk_sae(h, pool, args.expansion, args.k, seed) for h in hooks]
        train_epochs(saes, train_pool, seed, args.epochs)
        matrix = [[fvu(sae.eval(), raw[h]) for h in hooks] for sae in saes]
        matrices.append(matrix)
        if seed == 0:
            ce = transfer_matrix(saes, model, tokenizer, layers, dataset=dataset,
                                 tokens=args.ce_tokens, progress=False)  # fmt: skip
            if args.quick:  # a cell at the SAE's own layer is its ordinary FVU
                own = [ce["saes"][i]["cells"][i]["fvu"] for i in range(len(layers))]
                assert all(o == o for o in own)
    n = len(layers)
    fvu_stats = [[mean_ci([m[i][j] for m in matrices]) for j in range(n)] for i in range(n)]
    retained = [
        [mean_ci([(1 - m[i][j]) / (1 - m[j][j]) for m in matrices]) for j in range(n)]
        for i in range(n)
    ]
    if args.quick:
        for i in range(n):
            assert retained[i][i]["mean"] == 1.0

    # Steering: a CAA vector at one layer, moved to others, over bootstrap resamples of pairs.
    pairs = read_pairs(EXAMPLES / "sentiment_pairs.jsonl")
    eval_pairs = read_pairs(EXAMPLES / "love_hate.jsonl")
    if args.quick:
        pairs, eval_pairs = pairs[:4], eval_pairs[:2]
    steer_rows = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        sample = [pairs[i] for i in torch.randint(0, len(pairs), (len(pairs),), generator=g)]
        vector = caa_vector(model, tokenizer, sample, f"blocks.{vector_layer}.hook_resid_post")
        moved = layer_transfer(model, tokenizer, vector, steer_layers, [args.coef], eval_pairs)
        steer_rows.append(moved)
        if args.quick:
            own = next(c for c in moved["cells"] if c["layer"] == vector_layer)
            assert own["retained"][0] in (1.0, None)
    steer = {
        layer: mean_ci([next(c for c in r["cells"] if c["layer"] == layer)["retained"][0]
                        for r in steer_rows])
        for layer in steer_layers
    }  # fmt: skip
    reference = mean_ci([r["reference"][0] for r in steer_rows])

    later = [(i, j) for i in range(n) for j in range(n) if j > i]
    parts = [
        f"L{layers[i]}→L{layers[j]} retains {fmt(retained[i][j])} of the native explained variance"
        f" (FVU {fmt(fvu_stats[i][j])} vs {fmt(fvu_stats[j][j])})"
        for i, j in later
    ]
    transfers = [
        f"L{layers[i]}→L{layers[j]}"
        for i, j in later
        if retained[i][j]["mean"] - retained[i][j]["ci95"] > 0.5
    ]
    near = [layer for layer in steer_layers if layer != vector_layer]
    verdict = (
        "SAEs: "
        + "; ".join(parts)
        + ". "
        + (
            f"Transfer (> 50 % retained beyond seed noise) holds for {', '.join(transfers)}. "
            if transfers
            else "No SAE keeps > 50 % of the native explained variance at a later "
            "layer beyond the seed noise. "
        )  # fmt: skip
        + f"Steering (CAA at L{vector_layer}, effect there {fmt(reference)} at c = {args.coef:g}):"
        + " retained "
        + ", ".join(f"L{layer} {fmt(steer[layer])}" for layer in near)
        + "."
    )

    fig, (ax1, ax2) = figure(2)
    grid = [[retained[i][j]["mean"] for j in range(n)] for i in range(n)]
    im = ax1.imshow(grid, vmin=min(0.0, min(min(r) for r in grid)), vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax1.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax1.set_xticks(range(n), [f"L{x}" for x in layers])
    ax1.set_yticks(range(n), [f"L{x}" for x in layers])
    panel(ax1, "evaluated at", "trained at", "retained explained variance", legend=False)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    ax2.errorbar(steer_layers, [steer[x]["mean"] for x in steer_layers],
                 yerr=[steer[x]["ci95"] for x in steer_layers], fmt="o-", capsize=3)  # fmt: skip
    ax2.axhline(1, color="grey", lw=0.5)
    ax2.axhline(0, color="black", lw=0.5)
    ax2.axvline(vector_layer, color="grey", ls=":")
    panel(
        ax2,
        "layer the vector is added at",
        "effect retained",
        f"CAA vector from L{vector_layer}",
        legend=False,
    )
    return finish(
        args,
        out,
        NAME,
        claim=CLAIM,
        sizes={
            "layers": layers,
            "train_tokens": train_pool.n,
            "epochs": args.epochs,
            "heldout_tokens": held.n,
            "sae": f"TopK x{args.expansion} k{args.k}",
            "ce_tokens_per_cell": args.ce_tokens,
            "steer_layers": steer_layers,
            "caa_pairs": len(pairs),
            "eval_pairs": len(eval_pairs),
        },
        numbers={
            "fvu": fvu_stats,
            "retained_variance": retained,
            "ce_matrix_seed0": ce,
            "steering_reference_effect": reference,
            "steering_retained": steer,
        },
        verdict=verdict,
        fig=fig,
    )


if __name__ == "__main__":
    main()
