"""Evidence for dead-feature resampling: a ReLU SAE trained with and without it at equal tokens.

Both runs see the same batches in the same order from the same initialisation; the only
difference is ``train.resample_every_steps``. Dead features are those that never fire on held-out
tokens (never trained on). The L1 coefficient is deliberately high so that features die. Prints
one JSON line: dead fractions, held-out FVU, and the resample events of the second run.

Data: ``--model synthetic`` (default; each token a sum of 4 of 512 fixed unit directions in R^32,
more directions than features, so a dead feature is an optimisation failure rather than a
choice) or ``--model default`` (real activations of the embedded SmolLM2 on the default corpus,
through :class:`~saelab.data.activations.ActivationStream`; needs the cached default model).

Example::

    python benchmarks/resampling_dead.py --steps 300 --batch-size 256 --l1 3
    python benchmarks/resampling_dead.py --model default --steps 150 --batch-size 512 --l1 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes import ReLUSAE
from saelab.training.trainer import Trainer

HOOK = "h"
N_DIRECTIONS = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["synthetic", "default"], default="synthetic")
    p.add_argument("--hook", default="blocks.6.hook_resid_post", help="real data: hook point")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--l1", type=float, default=3.0, help="deliberately high L1 coefficient")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--every", type=int, default=25, help="train.resample_every_steps")
    p.add_argument("--until", type=float, default=0.75, help="train.resample_until_frac")
    p.add_argument(
        "--recipe",
        choices=["monosemanticity", "april"],
        default="monosemanticity",
        help="ReLU recipe: unit-norm decoder + pre-encoder bias (the one resampling belongs to), "
        "or the April-2024 norm-weighted L1",
    )
    p.add_argument("--heldout-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synthetic_batches(n: int, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    directions = torch.randn(N_DIRECTIONS, 32, generator=g)
    directions /= directions.norm(dim=-1, keepdim=True)
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        idx = torch.randint(0, N_DIRECTIONS, (batch, 4), generator=g)
        coef = torch.rand(batch, 4, generator=g) * 3
        out.append((coef[..., None] * directions[idx]).sum(1))
    return out


def real_batches(n: int, batch: int, hook: str, seed: int) -> tuple[list[torch.Tensor], float]:
    """``n`` normalised batches of the default model's activations, and their scale."""
    from saelab.data.activations import ActivationStream, special_token_ids
    from saelab.data.text import TokenBatches
    from saelab.models.loading import load_model

    model, tokenizer = load_model("default")
    tokens = TokenBatches("default", tokenizer, context=128, batch_size=8, seed=seed)
    stream = ActivationStream(
        model,
        tokens,
        [hook],
        batch_size=batch,
        buffer_size=max(8 * batch, 16_384),
        special_ids=special_token_ids(tokenizer),
        norm_estimate_tokens=8192,
        seed=seed,
    )
    batches = []
    for item in stream:
        batches.append(item[hook].float())
        if len(batches) == n:
            break
    return batches, float(stream.scales[hook])


def train(
    args: argparse.Namespace, batches: list[torch.Tensor], d_in: int, resample: bool, out: Path
) -> ReLUSAE:
    recipe = {}
    if args.recipe == "monosemanticity":
        recipe = {"decoder_unit_norm": True, "apply_b_dec_to_input": True}
    cfg = SAEConfig(
        hook=HOOK, architecture="relu", expansion=args.expansion, l1_coefficient=args.l1, **recipe
    )
    torch.manual_seed(args.seed)
    sae = ReLUSAE(cfg, d_in, seed=args.seed)
    extra = {}
    if resample:
        extra = {
            "resample_every_steps": args.every,
            "resample_until_frac": args.until,
            "resample_sample_tokens": 5 * args.batch_size,
            "resample_lr_warmup_steps": max(1, args.every // 3),
        }
    train_cfg = TrainConfig(
        tokens=args.steps * args.batch_size,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_warmup_frac=0.0,
        **extra,
    )
    Trainer([sae], train_cfg, out, progress=False, tensorboard=False).fit(
        {HOOK: x} for x in batches
    )
    return sae


@torch.no_grad()
def held_out_metrics(sae: ReLUSAE, x_ND: torch.Tensor) -> dict[str, float]:
    """Share of features that never fire on ``x_ND``, and its FVU (normalised units)."""
    feats_NF = sae.encode_normalised(x_ND).to_dense()
    recon_ND = sae.decode_feats(sae.encode_normalised(x_ND))
    fvu = (x_ND - recon_ND).pow(2).sum() / (x_ND - x_ND.mean(0)).pow(2).sum()
    return {"dead_frac": float(1 - (feats_NF > 0).any(0).double().mean()), "fvu": float(fvu)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    n_heldout = -(-args.heldout_tokens // args.batch_size)
    if args.model == "synthetic":
        batches = synthetic_batches(args.steps + n_heldout, args.batch_size, args.seed)
    else:
        batches, _ = real_batches(args.steps + n_heldout, args.batch_size, args.hook, args.seed)
    train_batches, held_out = batches[: args.steps], torch.cat(batches[args.steps :])
    d_in = train_batches[0].shape[-1]
    result: dict[str, object] = {
        "benchmark": "resampling_dead",
        "data": args.model,
        "recipe": args.recipe,
        "tokens": args.steps * args.batch_size,
        "d_in": d_in,
        "d_sae": d_in * args.expansion,
        "l1": args.l1,
        "resample_every_steps": args.every,
        "heldout_tokens": int(held_out.shape[0]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, resample in (("plain", False), ("resampled", True)):
            sae = train(args, train_batches, d_in, resample, Path(tmp) / label)
            for key, value in held_out_metrics(sae, held_out).items():
                result[f"{key}_{label}"] = round(value, 4)
        log = (Path(tmp) / "resampled" / "train_log.jsonl").read_text().splitlines()
        events = [r for r in map(json.loads, log) if r.get("event") == "resample"]
    result["resample_events"] = len(events)
    result["features_resampled"] = sum(e["n_resampled"] for e in events)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
