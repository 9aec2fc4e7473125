"""Equal budget: saelab's SAEs and the peers' TopK trainers on the same cached activations.

Every trainer gets the same rows of one ``saelab cache`` (layer-6 residual of the default model by
default), in the same order, at the same width, k, batch and token budget, and each is scored by
ONE formula in the raw units of the model on the same held-out rows::

    FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²        (x̄: the held-out mean, float64 sums)

Rows: the cache's first ``--heldout`` rows (whole documents of the text, in order) are held out;
a budget of N tokens trains on the next N rows, shuffled by ``--seed`` (one permutation of the
largest budget's rows, restricted to the first N: written to disk and read by every trainer), so
a smaller budget's rows are a prefix of a larger one's and every trainer sees the same batches.

Trainers (``--trainers``):

* ``saelab-topk``, ``saelab-batchtopk``, ``saelab-relu``: saelab's :class:`Trainer` at its
  defaults (``--saelab NAME:sae.field=v,train.field=v`` adds variants, for pilots);
* ``sparsify``: EleutherAI sparsify's ``SparseCoder`` and its trainer's step (FVU loss, AuxK,
  decoder-gradient projection, unit-norm decoder, its optimiser, LR rule and schedule);
* ``dictionary_learning``: ``dictionary_learning.trainers.top_k.TopKTrainer.update`` (Gao et
  al.'s recipe as Marks et al. implement it), step by step on our batches.

The peers run in their own interpreter (``--peer-python``: a venv with ``eai-sparsify`` and
``dictionary-learning``), as a subprocess of this file in ``--worker`` mode, which imports only
torch, safetensors and the peer: the cache is read through a small adapter here (the shard files
and ``index.json``, or ``progress.json`` of a cache still being written), and the worker writes its
held-out reconstructions, which this process scores.

Example::

    python benchmarks/equal_budget.py --cache runs/cache_l6 --budgets 98304,491520 \\
        --peer-python /tmp/peers/bin/python --out runs/equal_budget
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

HOOK = "blocks.6.hook_resid_post"
PEERS = ("sparsify", "dictionary_learning")
SAELAB_DEFAULTS = {
    "saelab-topk": "saelab-topk:sae.architecture=topk",
    "saelab-batchtopk": "saelab-batchtopk:sae.architecture=batchtopk",
    "saelab-relu": "saelab-relu:sae.architecture=relu",
}


# ----- the cache adapter (torch + safetensors only: the peer worker uses it too) ----------------


def cache_layout(cache_dir: Path, hook: str) -> tuple[list[tuple[str, int]], float, int]:
    """(shard files with their row counts, the scale √d/mean‖x‖, d_in) of a finished cache, or of
    one still being written (its ``progress.json``: the shards so far and the running norm sum)."""
    index = cache_dir / "index.json"
    if index.exists():
        raw = json.loads(index.read_text())
        shards = [(s["file"], int(s["count"])) for s in raw["shards"]]
        return shards, float(raw["scales"][hook]), int(raw["d_in"][hook])
    raw = json.loads((cache_dir / "progress.json").read_text())
    shards = [(s["file"], int(s["count"])) for s in raw["shards"]]
    if not shards:
        raise SystemExit(f"{cache_dir} has no finished shard yet")
    from safetensors import safe_open

    with safe_open(str(cache_dir / shards[0][0]), framework="pt") as handle:
        d_in = int(handle.get_slice(hook).get_shape()[1])
    mean_norm = raw["norm_sums"][hook] / raw["norm_rows"]
    return shards, math.sqrt(d_in) / mean_norm, d_in


def read_rows(cache_dir: Path, hook: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the cache in its own (text) order, raw float32 ``[stop-start, d]``."""
    from safetensors import safe_open

    shards, _, d_in = cache_layout(cache_dir, hook)
    out = torch.empty(stop - start, d_in)
    offset = 0
    for name, count in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            with safe_open(str(cache_dir / name), framework="pt") as handle:
                out[lo - start : hi - start] = handle.get_slice(hook)[
                    lo - offset : hi - offset
                ].float()
        offset += count
    if offset < stop:
        raise SystemExit(
            f"{cache_dir} has {offset:,} rows so far; {stop:,} are needed "
            "(a smaller --budgets or --heldout, or wait for the cache)"
        )
    return out


def fvu(x_TD: torch.Tensor, recon_TD: torch.Tensor) -> float:
    """The one formula every trainer is scored by, in raw units, float64 sums."""
    x, r = x_TD.double(), recon_TD.double()
    return float((x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _batches(train_TD: torch.Tensor, perm_T: torch.Tensor, batch: int, tokens: int):
    for start in range(0, tokens, batch):
        yield train_TD[perm_T[start : min(start + batch, tokens)]]


# ----- the peers (run under --peer-python) -------------------------------------------------------


def _dl_train(args, d_in: int, train_TD, perm_T, heldout_TD) -> tuple[torch.Tensor, float]:
    """dictionary_learning's TopK trainer, its ``update`` once per batch (what ``trainSAE``
    does), at its defaults (lr 2e-4/√(F/2¹⁴), AuxK 1/32, geometric-median b_dec, grad clip 1)
    but for the shared width, k and step count, and a warm-up of 5 % of the steps."""
    from dictionary_learning.trainers.top_k import TopKTrainer

    steps = math.ceil(args.tokens / args.batch_size)
    extra = json.loads(args.peer_kwargs or "{}")
    # Its default warm-up (1000 steps) must be shorter than the run (an assertion): 5 % of it.
    extra.setdefault("warmup_steps", max(1, round(0.05 * steps)))
    trainer = TopKTrainer(
        steps=steps,
        activation_dim=d_in,
        dict_size=d_in * args.expansion,
        k=args.k,
        layer=6,
        lm_name="default",
        seed=args.seed,
        device="cpu",
        **extra,
    )
    for step, x_BD in enumerate(_batches(train_TD, perm_T, args.batch_size, args.tokens)):
        trainer.update(step, x_BD)
    ae = trainer.ae.eval()
    with torch.no_grad():
        recon = torch.cat([ae(x) for x in heldout_TD.split(4096)])
        l0 = float(
            torch.cat([(ae.encode(x) > 0).sum(-1).float() for x in heldout_TD.split(4096)]).mean()
        )
    return recon, l0


def _sparsify_train(args, d_in: int, train_TD, perm_T, heldout_TD) -> tuple[torch.Tensor, float]:
    """sparsify's ``Trainer.fit`` step on our batches, at its defaults (``TrainConfig``): b_dec at
    the first batch's mean, unit-norm decoder before each forward, its FVU loss (+ AuxK when
    ``auxk_alpha`` > 0), decoder-gradient projection, and its default optimiser: SignSGD in a
    ScheduleFreeWrapper (momentum 0.95, lr 5e-3/√(F/2¹⁴), no schedule; evaluated at the averaged
    point, ``opt.eval()``, as its checkpoints are). ``{"optimizer": "adam"}`` instead: Adam at
    2e-4/√(F/2¹⁴) with ``get_linear_schedule_with_warmup(lr_warmup_steps, steps)``."""
    from sparsify.sparse_coder import SparseCoder, SparseCoderConfig

    extra = json.loads(args.peer_kwargs or "{}")
    optimizer = extra.pop("optimizer", "signum")
    lr_warmup = int(extra.pop("lr_warmup_steps", 1000))
    auxk_alpha = float(extra.pop("auxk_alpha", 0.0))
    dead_tokens = int(extra.pop("dead_feature_threshold", 10_000_000))
    lr_given = extra.pop("lr", None)
    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(expansion_factor=args.expansion, k=args.k, **extra)
    sae = SparseCoder(d_in, cfg, device="cpu", dtype=torch.float32)
    steps = math.ceil(args.tokens / args.batch_size)
    width_scale = (sae.num_latents / (2**14)) ** 0.5
    schedule = None
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        pgs = [{"params": sae.parameters(), "lr": lr_given or 5e-3 / width_scale}]
        opt = ScheduleFreeWrapper(SignSGD(pgs), momentum=0.95)
        opt.train()
    else:
        from transformers import get_linear_schedule_with_warmup

        opt = torch.optim.Adam([{"params": sae.parameters(), "lr": lr_given or 2e-4 / width_scale}])
        schedule = get_linear_schedule_with_warmup(opt, min(lr_warmup, steps - 1), steps)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    for step, x_BD in enumerate(_batches(train_TD, perm_T, args.batch_size, args.tokens)):
        if step == 0:
            sae.b_dec.data = x_BD.mean(0).to(sae.b_dec.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > dead_tokens if auxk_alpha > 0 else None
        out = sae(x_BD, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if schedule is not None:
            schedule.step()
        with torch.no_grad():
            since_fired += x_BD.shape[0]
            since_fired[out.latent_indices.flatten()] = 0
    if optimizer == "signum":
        opt.eval()
    with torch.no_grad():
        recons, l0s = [], []
        for x in heldout_TD.split(4096):
            out = sae(x)
            recons.append(out.sae_out)
            l0s.append((out.latent_acts > 0).sum(-1).float())
    return torch.cat(recons), float(torch.cat(l0s).mean())


def worker(args: argparse.Namespace) -> None:
    """``--worker PEER``: train one peer and write its held-out reconstructions."""
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    _, _, d_in = cache_layout(cache, args.hook)
    perm_T = torch.load(args.perm, weights_only=True)
    heldout_TD = read_rows(cache, args.hook, 0, args.heldout)
    train_TD = read_rows(cache, args.hook, args.heldout, args.heldout + len(perm_T))
    train = {"sparsify": _sparsify_train, "dictionary_learning": _dl_train}[args.worker]
    started = time.perf_counter()
    recon, l0 = train(args, d_in, train_TD, perm_T, heldout_TD)
    seconds = time.perf_counter() - started
    save_file({"recon": recon.float().contiguous()}, args.recon_out)
    print(json.dumps({"l0": l0, "train_s": seconds}))


# ----- saelab ------------------------------------------------------------------------------------


class _Stream:
    """Our batches as the trainer's stream: normalised rows and the cache's scale."""

    def __init__(self, train_TD, perm_T, batch: int, tokens: int, scale: float) -> None:
        self.args = (train_TD, perm_T, batch, tokens)
        self.scales = {HOOK: scale}

    def __iter__(self):
        for x_BD in _batches(*self.args):
            yield {HOOK: x_BD * self.scales[HOOK]}


def parse_spec(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``NAME:sae.f=v,train.f=v`` → (name, SAEConfig overrides, TrainConfig overrides)."""
    name, _, rest = spec.partition(":")
    sae_kw: dict[str, Any] = {}
    train_kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        section, _, field = key.strip().partition(".")
        parsed: Any
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        {"sae": sae_kw, "train": train_kw}[section][field] = parsed
    return name, sae_kw, train_kw


def train_saelab(spec: str, args, train_TD, perm_T, heldout_TD, scale, tokens):
    from saelab.config import SAEConfig, TrainConfig
    from saelab.saes import architecture_class
    from saelab.training.trainer import Trainer

    _, sae_kw, train_kw = parse_spec(spec)
    sae_kw = {"expansion": args.expansion, "k": args.k, **sae_kw}
    cfg = SAEConfig(hook=HOOK, **sae_kw)
    torch.manual_seed(args.seed)
    sae = architecture_class(cfg.architecture)(cfg, train_TD.shape[1], seed=args.seed)
    train_cfg = TrainConfig(tokens=tokens, batch_size=args.batch_size, **train_kw)
    trainer = Trainer([sae], train_cfg, None, progress=False, tensorboard=False)
    started = time.perf_counter()
    result = next(iter(trainer.fit(_Stream(train_TD, perm_T, args.batch_size, tokens, scale))))
    seconds = time.perf_counter() - started
    sae.eval()
    with torch.no_grad():
        recon = torch.cat([sae(x) for x in heldout_TD.split(4096)])
        l0 = float(
            torch.cat([(sae.encode(x) > 0).sum(-1).float() for x in heldout_TD.split(4096)]).mean()
        )
    dead = trainer.states[0].dead_F()
    del result
    return recon, l0, seconds, float(dead.double().mean())


# ----- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="runs/cache_l6", help="a saelab cache (finished or not)")
    p.add_argument("--hook", default=HOOK)
    p.add_argument(
        "--budgets", default="98304,491520,983040", help="training tokens, comma-separated"
    )
    p.add_argument("--heldout", type=int, default=65536, help="held-out rows (the cache's first)")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--trainers",
        default="saelab-topk,saelab-batchtopk,saelab-relu,sparsify,dictionary_learning",
        help="comma-separated; saelab-* names and the names of --saelab variants",
    )
    p.add_argument(
        "--saelab",
        action="append",
        default=[],
        help="a saelab variant NAME:sae.field=value,train.field=value (repeatable)",
    )
    p.add_argument("--peer-python", default=None, help="interpreter with the peers installed")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        help='a peer variant NAME:PEER:JSON, e.g. sparsify-adam:sparsify:{"optimizer":"adam"}',
    )
    p.add_argument("--peer-kwargs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/equal_budget", help="folder of results.json and plot")
    # worker mode (inside the peer interpreter)
    p.add_argument("--worker", choices=PEERS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--perm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recon-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_peer(
    peer: str, kwargs: str, args, perm_path: Path, tokens: int, out: Path
) -> tuple[torch.Tensor, dict]:
    from safetensors.torch import load_file

    recon_path = out / f"recon_{peer}_{tokens}.safetensors"
    cmd = [
        args.peer_python,
        __file__,
        "--worker",
        peer,
        "--cache",
        args.cache,
        "--hook",
        args.hook,
        "--heldout",
        str(args.heldout),
        "--expansion",
        str(args.expansion),
        "--k",
        str(args.k),
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "--tokens",
        str(tokens),
        "--perm",
        str(perm_path),
        "--recon-out",
        str(recon_path),
    ]
    if kwargs:
        cmd += ["--peer-kwargs", kwargs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{peer} failed:\n{done.stderr[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    recon = load_file(str(recon_path))["recon"]
    recon_path.unlink()
    return recon, info


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saelab.atomic import write_atomically

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["trainer"] for r in results):
        rows = sorted((r["tokens"], r["fvu"]) for r in results if r["trainer"] == name)
        ax.plot([t for t, _ in rows], [f for _, f in rows], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out FVU (raw units)")
    ax.set_title("equal budget: x16, k 32, batch 4096")
    ax.legend(fontsize=8)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    from saelab.atomic import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    budgets = sorted(int(float(b)) for b in args.budgets.split(","))
    _, scale, _ = cache_layout(cache, args.hook)
    specs = dict(SAELAB_DEFAULTS)
    for spec in args.saelab:
        specs[spec.partition(":")[0]] = spec
    peers = {p: (p, "") for p in PEERS}
    for spec in args.peer:
        name, peer, kwargs = spec.split(":", 2)
        peers[name] = (peer, kwargs)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [t for t in trainers if t not in specs and t not in peers]
    if unknown:
        raise SystemExit(f"unknown trainers {unknown}; known: {sorted(specs) + sorted(peers)}")
    if any(t in peers for t in trainers) and not args.peer_python:
        raise SystemExit("peers need --peer-python (an interpreter with them installed)")
    largest = budgets[-1]
    perm_T = torch.randperm(largest, generator=torch.Generator().manual_seed(args.seed))
    perm_path = out / "perm.pt"
    heldout_TD = read_rows(cache, args.hook, 0, args.heldout)
    results_path = out / "results.json"
    results: list[dict] = json.loads(results_path.read_text()) if results_path.exists() else []
    for tokens in budgets:
        # The first `tokens` rows of the shuffled order, re-indexed: a prefix of the largest.
        sub_T = perm_T[perm_T < tokens] if tokens < largest else perm_T
        torch.save(sub_T.clone(), perm_path)
        train_TD = None
        for name in trainers:
            if name in peers:
                recon, info = run_peer(*peers[name], args, perm_path, tokens, out)
                seconds, l0, dead = info["train_s"], info["l0"], None
            else:
                if train_TD is None:
                    train_TD = read_rows(cache, args.hook, args.heldout, args.heldout + tokens)
                recon, l0, seconds, dead = train_saelab(
                    specs[name], args, train_TD, sub_T, heldout_TD, scale, tokens
                )
            row = {
                "trainer": name,
                "spec": specs[name] if name in specs else ":".join(peers[name]),
                "tokens": tokens,
                "fvu": round(fvu(heldout_TD, recon), 5),
                "l0": round(l0, 2),
                "frac_dead": dead,
                "train_s": round(seconds, 1),
            }
            print(json.dumps(row), flush=True)
            results = [
                r
                for r in results
                if not (r["trainer"] == name and r["tokens"] == tokens and r["spec"] == row["spec"])
            ]
            results.append(row)
            write_json(results_path, results)
        del train_TD
    plot(results, out / "equal_budget.png")
    print(f"{results_path}  {out / 'equal_budget.png'}")


if __name__ == "__main__":
    main()
