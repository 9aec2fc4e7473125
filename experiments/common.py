"""What every experiment shares: arguments, seeds, activations held in memory, a stream for the
trainer, confidence intervals and verdicts, and the atomic ``result.json`` + PNG.

An experiment is a script ``experiments/NAME.py`` with a ``main(argv)``; ``--quick`` runs it on a
tiny random model (or tiny sizes) in seconds and asserts only what holds by construction,
the full mode runs it on the default model over ``--seeds`` seeds and states whether the effect
is larger than the seed noise (mean ± 95 % Student-t interval over seeds).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import write_atomically, write_json, write_text

EXPERIMENTS_DIR = Path(__file__).resolve().parent
RESULT_FILENAME = "result.json"
DEFAULT_HOOK = "blocks.6.hook_resid_post"

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (then the normal's).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

log = logging.getLogger("experiments")


# ----- arguments and set-up --------------------------------------------------------------------


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The arguments every experiment takes; each adds its own sizes."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], prog=f"experiments/{name}.py")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds; invariants only")
    p.add_argument("--out", default=None, help=f"output folder (default runs/experiments/{name})")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def setup(args: argparse.Namespace, name: str) -> Path:
    """Threads, logging and the output folder (created); fills the defaults of ``args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 3
    if not args.quick and args.seeds < 3:
        raise SystemExit(f"experiments/{name}.py: a full run needs --seeds >= 3")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out or f"runs/experiments/{name}" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    args.started = time.perf_counter()
    return out


def progress() -> bool:
    return sys.stderr.isatty()


def tiny_model(family: str = "llama"):
    """A tiny random model of ``family`` with a byte-level tokenizer (nothing downloaded)."""
    sys.path.insert(0, str(EXPERIMENTS_DIR.parent / "tests"))
    from tiny_models import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    return build_tiny_model(family).eval(), build_tiny_tokenizer()


def load(args: argparse.Namespace, family: str = "llama"):
    """(model, tokenizer, model name): the tiny model with ``--quick``, else the default one."""
    if args.quick:
        model, tokenizer = tiny_model(family)
        return model, tokenizer, f"tiny-{family}"
    from saelab.models.loading import load_model

    model, tokenizer = load_model("default")
    return model, tokenizer, "default"


def text_file(out: Path, name: str, lines: Sequence[str]) -> Path:
    """``out/name`` holding ``lines`` (a text spec for the library's readers)."""
    return write_text(out / name, "\n".join(lines) + "\n")


def quick_text(out: Path, n: int = 200) -> str:
    """A small text for the tiny model, whose tokenizer knows the words ``w3`` … ``w255``:
    Zipf-distributed words, so token identity and frequency vary as in real text."""
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 254, dtype=torch.float64)
    lines = []
    for _ in range(n):
        idx = torch.multinomial(weights, 24, replacement=True, generator=g).tolist()
        lines.append(" ".join(f"w{i + 3}" for i in idx))
    return str(text_file(out, "quick_text.txt", lines))


def dataset_for(args: argparse.Namespace, out: Path) -> str:
    """The text spec experiments read: the default corpus, or the quick text with ``--quick``."""
    return quick_text(out) if args.quick else "default"


def hook_for(args: argparse.Namespace) -> str:
    """The hook a one-hook experiment studies: layer 1 of the tiny model with ``--quick``, else
    :data:`DEFAULT_HOOK`."""
    return "blocks.1.hook_resid_post" if args.quick else DEFAULT_HOOK


def cache_for(args: argparse.Namespace) -> Path | None:
    """Where :func:`collect` keeps activations: :data:`ACTIVATION_CACHE` for full runs, nowhere
    with ``--quick``."""
    return None if args.quick else ACTIVATION_CACHE


# ----- activations in memory ------------------------------------------------------------------


@dataclass
class Pool:
    """Activations of some hooks in memory, in normalised units (E‖x‖ = √d_in per hook), with
    where each row came from (context position and token id)."""

    acts: dict[str, torch.Tensor]
    """hook → ``[N, d]`` float32, normalised."""
    scales: dict[str, float]
    """hook → the scale s with normalised = s · raw."""
    positions: torch.Tensor
    """``[N]`` position of each row in its context (1 = the first after BOS)."""
    token_ids: torch.Tensor
    """``[N]`` the token at each row."""

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    def split(self, n_train: int) -> tuple[Pool, Pool]:
        """The first ``n_train`` rows and the rest."""

        def part(sl: slice) -> Pool:
            return Pool(
                {h: a[sl] for h, a in self.acts.items()},
                self.scales,
                self.positions[sl],
                self.token_ids[sl],
            )

        return part(slice(0, n_train)), part(slice(n_train, None))

    def permuted(self, seed: int) -> Pool:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        return Pool(
            {h: a[order] for h, a in self.acts.items()},
            self.scales,
            self.positions[order],
            self.token_ids[order],
        )


ACTIVATION_CACHE = Path("runs/experiments/_activations")
"""Where full runs keep the activations they collected (the first N rows of a longer collection
are exactly a shorter one, so every experiment at a hook reuses the longest)."""


def collect(
    model,
    tokenizer,
    hooks: Sequence[str],
    tokens: int,
    *,
    dataset: str = "default",
    context: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    cache: Path | None = None,
) -> Pool:
    """``tokens`` activations of each hook from ``dataset`` (BOS and special tokens dropped),
    in order; scales from their mean norms, as the library's activation stream does. With
    ``cache`` (a folder), rows collected before are read from there instead."""
    if cache is None:
        return _collect(model, tokenizer, hooks, tokens, dataset, context, batch_size, seed)
    from saelab.atomic import write_safetensors
    from saelab.safetensors_check import read_tensors

    slug = "".join(ch if ch.isalnum() else "_" for ch in dataset)[-40:]
    folder = Path(cache) / f"{slug}-ctx{context}-seed{seed}"
    have = {}
    for hook in hooks:
        path = folder / f"{hook}.safetensors"
        if path.is_file():
            t = read_tensors(path, fix="delete it to collect again")
            if t["acts"].shape[0] >= tokens:
                have[hook] = t
    if len(have) < len(hooks):
        pool = _collect(model, tokenizer, hooks, tokens, dataset, context, batch_size, seed)
        for hook in hooks:
            write_safetensors(
                folder / f"{hook}.safetensors",
                {
                    "acts": pool.acts[hook].contiguous(),
                    "scale": torch.tensor([pool.scales[hook]]),
                    "positions": pool.positions,
                    "token_ids": pool.token_ids,
                },
            )
        return pool
    first = have[hooks[0]]
    raw = {h: t["acts"][:tokens] / float(t["scale"][0]) for h, t in have.items()}
    # The scale of the first `tokens` rows, as a fresh collection of that many would get.
    scales = {h: math.sqrt(a.shape[1]) / float(a.norm(dim=1).mean()) for h, a in raw.items()}
    return Pool(
        {h: raw[h] * scales[h] for h in hooks},
        scales,
        first["positions"][:tokens],
        first["token_ids"][:tokens],
    )


@torch.no_grad()
def _collect(model, tokenizer, hooks, tokens, dataset, context, batch_size, seed) -> Pool:
    from saelab.data.activations import special_token_ids, token_mask
    from saelab.data.text import TokenBatches
    from saelab.models.intervene import run_to_hooks

    batches = TokenBatches(dataset, tokenizer, context=context, batch_size=batch_size, seed=seed)
    specials = special_token_ids(tokenizer)
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    positions, token_ids, count = [], [], 0
    for tokens_NP in batches:
        keep_NP = token_mask(tokens_NP, 1, specials)
        acts = run_to_hooks(model, tokens_NP, list(hooks))
        for hook in hooks:
            parts[hook].append(acts[hook].float()[keep_NP])
        pos_NP = torch.arange(tokens_NP.shape[1]).expand_as(tokens_NP)
        positions.append(pos_NP[keep_NP])
        token_ids.append(tokens_NP[keep_NP])
        count += int(keep_NP.sum())
        if count >= tokens:
            break
    raw = {h: torch.cat(p)[:tokens] for h, p in parts.items()}
    scales = {h: math.sqrt(a.shape[1]) / float(a.norm(dim=1).mean()) for h, a in raw.items()}
    return Pool(
        {h: raw[h] * scales[h] for h in hooks},
        scales,
        torch.cat(positions)[:tokens],
        torch.cat(token_ids)[:tokens],
    )


class PoolStream:
    """Batches of a :class:`Pool` for :class:`~saelab.training.Trainer`, reshuffled each epoch,
    with the ``scales`` attribute the trainer folds into the SAEs."""

    def __init__(self, pool: Pool, batch_size: int, seed: int, epochs: int = 1) -> None:
        self.pool, self.batch_size, self.seed, self.epochs = pool, batch_size, seed, epochs
        self.scales = dict(pool.scales)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for epoch in range(self.epochs):
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            order = torch.randperm(self.pool.n, generator=g)
            for start in range(0, self.pool.n - self.batch_size + 1, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield {h: a[idx] for h, a in self.pool.acts.items()}

    def steps(self) -> int:
        return self.epochs * (self.pool.n // self.batch_size)


def train(saes, train_cfg, stream: PoolStream, out: Path | None = None) -> dict[str, Any]:
    """Train ``saes`` together on ``stream`` (one trainer); returns the trainer's results."""
    from saelab.training import Trainer

    trainer = Trainer(saes, train_cfg, out, progress=progress(), tensorboard=False)
    return trainer.fit(stream)


def topk_sae(hook: str, pool: Pool, expansion: int, k: int, seed: int):
    """An untrained TopK SAE at ``hook``, as wide as ``pool``'s activations there."""
    from saelab.config import SAEConfig
    from saelab.saes import TopKSAE

    cfg = SAEConfig(hook=hook, architecture="topk", expansion=expansion, k=k)
    return TopKSAE(cfg, pool.acts[hook].shape[1], seed=seed)


def train_epochs(
    saes, pool: Pool, seed: int, epochs: int, out: Path | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """Train ``saes`` together for ``epochs`` passes over ``pool`` in batches of ``batch_size``
    (reshuffled each epoch from ``seed``); returns the trainer's results."""
    from saelab.config import TrainConfig

    stream = PoolStream(pool, batch_size, seed=seed, epochs=epochs)
    cfg = TrainConfig(tokens=stream.steps() * batch_size, batch_size=batch_size)
    return train(list(saes), cfg, stream, out)


@torch.no_grad()
def fvu_and_density(sae, x_ND: torch.Tensor, scale: float) -> dict[str, Any]:
    """Held-out FVU and per-feature density of ``sae`` on normalised rows ``x_ND``."""
    raw = x_ND / scale
    feats = sae.encode(raw)
    recon = sae.decode(feats)
    fvu = float((raw - recon).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum())
    density = (feats > 0).double().mean(0)
    return {"fvu": fvu, "density": density, "l0": float((feats > 0).double().sum(1).mean())}


# ----- statistics and verdicts ----------------------------------------------------------------


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95 % Student-t half-width over seeds (values that
    are None or NaN, a ratio with a zero denominator, are left out and counted)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "sd": math.nan, "ci95": math.nan, "n": 0, "values": [],
                "left_out": len(values)}  # fmt: skip
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "ci95": half, "n": n, "values": xs,
            "left_out": len(values) - n}  # fmt: skip


def fmt(stat: dict[str, Any], digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}g} ± {stat['ci95']:.{digits}g}"


def paired(
    a: Sequence[float], b: Sequence[float], what: str, larger_is: str = "a"
) -> dict[str, Any]:
    """The per-seed difference a − b with its interval, and whether it exceeds the seed noise
    (the 95 % interval excludes 0)."""
    diff = mean_ci([x - y for x, y in zip(a, b, strict=True)])
    beyond = bool(abs(diff["mean"]) > diff["ci95"]) if math.isfinite(diff["ci95"]) else False
    return {
        "what": what,
        "a": mean_ci(a),
        "b": mean_ci(b),
        "difference": diff,
        "exceeds_seed_noise": beyond,
    }


# ----- results ---------------------------------------------------------------------------------


def write_png(path: Path, fig) -> Path:
    """``fig`` as a PNG at ``path``, atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = buffer.getvalue()
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


def figure(n_panels: int = 1, width: float = 5.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def panel(
    ax,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    legend: bool = True,
) -> None:
    """Label one panel (after everything is drawn on it) and give it the small legend."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)


def finish(
    args: argparse.Namespace,
    out: Path,
    name: str,
    *,
    claim: str,
    sizes: dict[str, Any],
    numbers: dict[str, Any],
    verdict: str,
    fig,
) -> dict[str, Any]:
    """Write ``out/result.json`` and ``out/NAME.png`` (both atomically) and print the verdict."""
    if args.quick:  # tiny sizes say nothing about the claim
        verdict = f"quick run (tiny sizes): the invariants hold; no verdict ({verdict})"
    png = write_png(out / f"{name}.png", fig)
    result = {
        "experiment": name,
        "claim": claim,
        "mode": "quick" if args.quick else "full",
        "model": "tiny random" if args.quick else "default (SmolLM2-135M)",
        "seeds": list(range(args.seeds)),
        "sizes": sizes,
        "numbers": _plain(numbers),
        "verdict": verdict,
        "figure": str(png),
        "seconds": round(time.perf_counter() - args.started, 1),
    }
    write_json(out / RESULT_FILENAME, result)
    print(f"{name}: {verdict}")
    print(f"result.json and {png.name} in {out} ({result['seconds']} s)")
    return result


def _plain(obj: Any) -> Any:
    """Tensors and numbers as JSON-ready lists and floats."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_result(out: Path) -> dict[str, Any]:
    return json.loads((Path(out) / RESULT_FILENAME).read_text())
