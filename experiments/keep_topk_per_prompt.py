"""Keep top-k per prompt vs a low-L0 SAE: TopK SAEs with L0 ≈ 50 and L0 ≈ 10 trained together
(one sweep) on text that includes IOI-style sentences; the L0 = 50 SAE keeping only its top 10
features **per prompt** (scores summed over the prompt's positions, the same 10 kept at every
position; others zero-ablated) against the L0 = 10 SAE, on IOI and on a next-token task from
the default text, with and without the error term, over seeds; plus each SAE's faithfulness
curve on IOI (ATP ranking, mean ablation).

Founding note: "using an L0=50 SAE while only keeping the top 10 features by activation value per
prompt (and zero ablating the others) was better than an L0=10 SAE by our task-specific metric".

What changed against the earlier attempt (docs/results.md, "Circuits"): that one kept the top 10
per position and its SAEs saw only unrelated text (Python documentation); here the keeping is per
prompt (``analysis/circuits/keep.py``, ``per="prompt"``), the SAEs' training text mixes IOI-style
sentences (other names and templates than the scored prompts) into the default text, a second
task comes from the default text itself, and everything is repeated over seeds.

``--quick`` asserts what holds by construction: with the error term, the full SAE reproduces the
clean metric exactly; keeping k ≥ d_sae features per prompt equals the full SAE.

    python experiments/keep_topk_per_prompt.py --quick
    python experiments/keep_topk_per_prompt.py
"""

from __future__ import annotations

import torch

from common import (
    Pool,
    cache_for,
    collect,
    dataset_for,
    figure,
    finish,
    fmt,
    hook_for,
    load,
    mean_ci,
    paired,
    panel,
    parser,
    setup,
    text_file,
    topk_sae,
    train_epochs,
)
from saelab.analysis.circuits import (
    SplicedModel,
    Task,
    clean_metric,
    faithfulness_curve,
    ioi_task,
    keep_topk_edit,
    node_effects,
    tokenize_task,
)
from saelab.data.text import TokenBatches
from saelab.saes import TopKSAE

NAME = "keep_topk_per_prompt"
CLAIM = "an L0=50 SAE keeping its top 10 features per prompt beats an L0=10 SAE on the task"
VARIANTS = (
    "L0=50 full",
    "L0=50 top10/prompt",
    "L0=50 top10/prompt +error",
    "L0=50 top10/position",
    "L0=10 full",
)


@torch.no_grad()
def text_task(model, tokenizer, n: int, dataset: str, length: int = 24, seed: int = 123) -> Task:
    """Prompts of ``length`` tokens of ``dataset`` whose next token the model predicts right;
    the rival answer is its second choice (metric: their logit difference)."""
    rows = next(iter(TokenBatches(dataset, tokenizer, context=length + 1, batch_size=3 * n,
                                  seed=seed)))  # fmt: skip
    logits = model(rows[:, :length], use_cache=False).logits[:, -1]
    top2 = logits.topk(2, dim=-1).indices
    prompts, correct, incorrect = [], [], []
    for row, (first, second) in zip(rows.tolist(), top2.tolist(), strict=True):
        if first != row[length] or len(prompts) == n:
            continue
        prompts.append(tokenizer.decode(row[1:length]))
        correct.append(tokenizer.decode([first]))
        incorrect.append(tokenizer.decode([second]))
    if not prompts:  # a random model predicts nothing right: take its own first choice
        for row, (first, second) in list(zip(rows.tolist(), top2.tolist(), strict=True))[:n]:
            prompts.append(tokenizer.decode(row[1:length]))
            correct.append(tokenizer.decode([first]))
            incorrect.append(tokenizer.decode([second]))
    return Task("default-text", tuple(prompts), tuple(correct), tuple(incorrect))


def concat(a: Pool, b: Pool) -> Pool:
    """Rows of both pools (interleaved by the stream's shuffle), one scale per hook again."""
    acts, scales = {}, {}
    for hook in a.acts:
        raw = torch.cat([a.acts[hook] / a.scales[hook], b.acts[hook] / b.scales[hook]])
        scales[hook] = raw.shape[1] ** 0.5 / float(raw.norm(dim=1).mean())
        acts[hook] = raw * scales[hook]
    return Pool(acts, scales, torch.cat([a.positions, b.positions]),
                torch.cat([a.token_ids, b.token_ids]))  # fmt: skip


def score(model, saes: dict[int, TopKSAE], batch, k: int) -> dict[str, float]:
    """The mean task metric of every variant (and the clean model)."""
    big, small = SplicedModel(model, [saes[max(saes)]]), SplicedModel(model, [saes[min(saes)]])
    hook = big.hooks[0]
    splice_NP = big.splice_mask(batch.mask_NP)

    def kept(per: str, add_error: bool) -> dict:
        return {hook: keep_topk_edit(k, splice_NP, per=per, add_error=add_error)}

    runs = {
        "L0=50 full": big.metric(batch, add_error=False),
        "L0=50 top10/prompt": big.metric(batch, kept("prompt", False)),
        "L0=50 top10/prompt +error": big.metric(batch, kept("prompt", True)),
        "L0=50 top10/position": big.metric(batch, kept("position", False)),
        "L0=10 full": small.metric(batch, add_error=False),
    }
    return {name: float(m.mean()) for name, m in runs.items()}


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, NAME)
    p.add_argument("--tokens", type=int, default=12_288, help="default-text training tokens")
    p.add_argument("--ioi-tokens", type=int, default=4096, help="IOI-style training tokens")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--prompts", type=int, default=24, help="prompts per task")
    p.add_argument("--faithfulness", default="0,10,50", help="circuit sizes (seed 0, IOI)")
    args = p.parse_args(argv)
    out = setup(args, NAME)
    model, tokenizer, _ = load(args)
    hook = hook_for(args)
    high, low, k = (50, 10, 10) if not args.quick else (8, 2, 2)
    if args.quick:
        args.tokens, args.ioi_tokens, args.expansion, args.prompts = 768, 256, 2, 4
        args.epochs = 1
        args.faithfulness = "0,2"
    dataset = dataset_for(args, out)
    words = {}  # the tiny tokenizer knows only w3 … w255
    if args.quick:
        words = {"names": [f"w{i}" for i in range(10, 20)], "places": ["w30", "w31"],
                 "objects": ["w40", "w41"]}  # fmt: skip
    # IOI-style training sentences: the templates with other draws than the scored prompts.
    train_ioi = ioi_task(tokenizer, n_prompts=400, seed=7, **words)
    sentences = [p + c + "." for p, c in zip(train_ioi.prompts, train_ioi.correct, strict=True)]
    ioi_file = text_file(out, "ioi_train.txt", sentences)
    base = collect(model, tokenizer, [hook], args.tokens, dataset=dataset, seed=0,
                   cache=cache_for(args))  # fmt: skip
    ioi_pool = collect(model, tokenizer, [hook], args.ioi_tokens, dataset=str(ioi_file), seed=0)
    pool = concat(base, ioi_pool)
    tasks = {
        "ioi": tokenize_task(
            ioi_task(tokenizer, n_prompts=args.prompts, seed=0, **words), tokenizer
        ),  # fmt: skip
        "default-text": tokenize_task(
            text_task(model, tokenizer, args.prompts, dataset), tokenizer
        ),  # fmt: skip
    }
    clean = {name: float(clean_metric(model, b).mean()) for name, b in tasks.items()}
    per_seed = {name: [] for name in tasks}
    faith = {}
    counts = [int(c) for c in args.faithfulness.split(",")]
    for seed in range(args.seeds):
        saes = {kk: topk_sae(hook, pool, args.expansion, kk, seed) for kk in (high, low)}
        train_epochs(saes.values(), pool, seed, args.epochs)
        for sae in saes.values():
            sae.eval()
        for name, batch in tasks.items():
            per_seed[name].append(score(model, saes, batch, k))
        if args.quick:
            batch = tasks["ioi"]
            spliced = SplicedModel(model, [saes[high]])
            exact = spliced.metric(batch)  # full SAE + error term = the clean model
            assert torch.allclose(exact, clean_metric(model, batch), atol=1e-4)
            every = {hook: keep_topk_edit(saes[high].d_sae, spliced.splice_mask(batch.mask_NP),
                                          per="prompt")}  # fmt: skip
            assert torch.allclose(spliced.metric(batch, every, add_error=False),
                                  spliced.metric(batch, add_error=False), atol=1e-5)  # fmt: skip
        if seed == 0:
            for kk, sae in saes.items():
                spliced = SplicedModel(model, [sae])
                effects = node_effects(spliced, tasks["ioi"], "atp")
                faith[f"L0={kk}"] = faithfulness_curve(spliced, tasks["ioi"], effects,
                                                       counts=counts)  # fmt: skip

    share = {
        name: {v: mean_ci([r[v] / clean[name] for r in rows]) for v in VARIANTS}
        for name, rows in per_seed.items()
    }
    comparisons = {
        name: paired([r["L0=50 top10/prompt"] / clean[name] for r in rows],
                     [r["L0=10 full"] / clean[name] for r in rows],
                     "share of the clean metric: L0=50 top 10 per prompt − L0=10 full")
        for name, rows in per_seed.items()
    }  # fmt: skip
    wins = {
        name: c["exceeds_seed_noise"] and c["difference"]["mean"] > 0
        for name, c in comparisons.items()
    }
    parts = []
    for name, c in comparisons.items():
        parts.append(
            f"{name} (clean {clean[name]:.2f}): top 10/prompt of L0=50 keeps "
            f"{fmt(c['a'])} of the clean metric, the L0=10 SAE {fmt(c['b'])}, L0=50 full "
            f"{fmt(share[name]['L0=50 full'])}, top 10/position "
            f"{fmt(share[name]['L0=50 top10/position'])}, top 10/prompt + error "
            f"{fmt(share[name]['L0=50 top10/prompt +error'])} (difference {fmt(c['difference'])}, "
            + ("beyond" if c["exceeds_seed_noise"] else "within")
            + " seed noise)"
        )
    verdict = (
        (
            "Confirmed on " + " and ".join(n for n, w in wins.items() if w) + ". "
            if any(wins.values())
            else "Not confirmed: "
        )  # fmt: skip
        + "; ".join(parts)
    )

    fig, (ax1, ax2) = figure(2, width=5.5)
    xs = range(len(VARIANTS))
    for j, name in enumerate(tasks):
        ax1.bar([x + 0.4 * j for x in xs], [share[name][v]["mean"] for v in VARIANTS], 0.38,
                yerr=[share[name][v]["ci95"] for v in VARIANTS], capsize=3, label=name)  # fmt: skip
    ax1.axhline(1, color="grey", lw=0.5)
    ax1.axhline(0, color="black", lw=0.5)
    ax1.set_xticks([x + 0.2 for x in xs], VARIANTS, rotation=30, ha="right", fontsize=7)
    panel(ax1, None, "task metric ÷ clean", f"{args.seeds} seeds, {args.prompts} prompts per task")
    for label, curve in faith.items():
        ax2.plot(curve["n_features"], curve["faithfulness"], "o-", label=label)
    ax2.set_xscale("symlog", linthresh=1)
    panel(ax2, "features kept (ATP ranking)", "faithfulness", "IOI faithfulness, seed 0")
    return finish(
        args,
        out,
        NAME,
        claim=CLAIM,
        sizes={
            "hook": hook,
            "train_tokens": {"default_text": base.n, "ioi_style": ioi_pool.n},
            "epochs": args.epochs,
            "saes": f"TopK x{args.expansion}, k={high} and k={low}, trained together",
            "kept": k,
            "prompts_per_task": args.prompts,
            "faithfulness_counts": counts,
        },
        numbers={
            "clean": clean,
            "per_seed": per_seed,
            "share_of_clean": share,
            "comparisons": comparisons,
            "faithfulness": faith,
        },
        verdict=verdict,
        fig=fig,
    )


if __name__ == "__main__":
    main()
