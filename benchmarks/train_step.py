"""Throughput of one SAE training step, exactly as ``Trainer`` runs it, on random activations.

Builds a real :class:`~saelab.training.trainer.Trainer` (no output folder, no progress bar) and
times its ``_train_step`` on ``torch.randn`` batches scaled so that E‖x‖ = √d_in, the units the
trainer sees. Each phase of the step is timed by wrapping the method that runs it, so the
breakdown adds up to the step. Prints one JSON line.

With ``--peers``, SAELens (and EleutherAI's sparsify, when installed) run their equivalent step on
the same batches in the same process, and ``ratio_vs_<peer>`` = our vectors/s ÷ theirs.

Example::

    python benchmarks/train_step.py --arch topk --steps 8 --warmup 2 --threads 2 --peers
    python benchmarks/train_step.py --arch topk --device cuda --batch-size 16384 --peers

On CUDA every phase is bracketed by ``torch.cuda.synchronize()`` so the breakdown measures kernels,
not launches; SAELens is skipped there unless it is importable.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.saes import SparseAutoencoder, architecture_class
from saelab.training import trainer as trainer_module
from saelab.training.trainer import Trainer

HOOK = "bench"
N_BATCHES = 4
"""Distinct random batches cycled through, so no step sees the batch the previous one saw."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["topk", "relu"], default="topk")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peers", action="store_true", help="also time SAELens / sparsify")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--autocast-bf16", action="store_true", help="CUDA: the trainer's bf16 autocast option"
    )
    p.add_argument(
        "--bf16-encoder",
        action="store_true",
        help="TopK: rank features with a bf16 GEMM (opt-in SAE attribute bf16_encoder)",
    )
    p.add_argument(
        "--relu-l0",
        type=float,
        default=None,
        help="ReLU: shift b_enc so about this many features fire per token, as in a trained SAE "
        "(from init about half of them fire and every product is dense)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print a torch.profiler table of two steps to stderr",
    )
    return p.parse_args(argv)


def make_batches(args: argparse.Namespace) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(N_BATCHES):
        x_BD = torch.randn(args.batch_size, args.d_in, generator=g)
        batches.append(x_BD * (args.d_in**0.5 / x_BD.norm(dim=-1).mean()))
    return [x_BD.to(args.device) for x_BD in batches]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_trainer(args: argparse.Namespace, batches: list[torch.Tensor]) -> Trainer:
    cfg = SAEConfig(hook=HOOK, architecture=args.arch, expansion=args.expansion, k=args.k)
    sae: SparseAutoencoder = architecture_class(args.arch)(cfg, args.d_in, seed=args.seed)
    sae.to(args.device)
    if args.bf16_encoder:
        sae.bf16_encoder = True
    # Enough tokens that the timed steps sit on the flat part of the learning-rate schedule.
    train_cfg = TrainConfig(
        tokens=args.batch_size * 10_000,
        batch_size=args.batch_size,
        autocast_bf16=args.autocast_bf16,
    )
    trainer = Trainer([sae], train_cfg, None, progress=False, tensorboard=False)
    trainer._init_from_first_batch({HOOK: batches[0]}, None)
    if args.relu_l0 is not None and args.arch == "relu":
        with torch.no_grad():
            pre_BF = sae.sae_input(batches[0][:256]) @ sae.W_enc + sae.b_enc
            quantile = 1 - args.relu_l0 / sae.d_sae
            sae.b_enc.sub_(torch.quantile(pre_BF.flatten()[: 1 << 24], quantile))
    trainer.step = 1_000
    return trainer


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class PhaseTimer:
    """Accumulates wall time and page faults per named phase within one step."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.faults: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            _sync(self.device)
            faults, start = _page_faults(), time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                _sync(self.device)
                self.current[name] += time.perf_counter() - start
                self.faults[name] += _page_faults() - faults

        return timed

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        out = dict(self.current), dict(self.faults)
        self.current, self.faults = defaultdict(float), defaultdict(int)
        return out


@contextlib.contextmanager
def phases_timed(trainer: Trainer, timer: PhaseTimer) -> Iterator[None]:
    """Wrap every phase of ``Trainer._train_step`` (instance attributes, restored after)."""
    state = trainer.states[0]
    sae, opt = state.sae, state.optimizer
    patched = [
        (sae, "training_step", "forward"),
        (sae, "before_optimizer_step_", "grad_constraint"),
        (opt, "step", "optimizer_step"),
        (opt, "zero_grad", "zero_grad"),
        (sae, "after_optimizer_step_", "weight_constraint"),
        (trainer, "_update_feature_stats", "feature_stats"),
    ]
    for obj, attr, name in patched:
        setattr(obj, attr, timer.wrap(name, getattr(obj, attr)))
    clip_owner = trainer_module if hasattr(trainer_module, "clip_grad_norm_") else torch.nn.utils
    original_clip = clip_owner.clip_grad_norm_
    clip_owner.clip_grad_norm_ = timer.wrap("clip_grad_norm", original_clip)
    original_backward = torch.Tensor.backward
    torch.Tensor.backward = timer.wrap("backward", original_backward)
    try:
        yield
    finally:
        torch.Tensor.backward = original_backward
        clip_owner.clip_grad_norm_ = original_clip
        for obj, attr, _ in patched:
            delattr(obj, attr)


def time_saelab(args: argparse.Namespace, batches: list[torch.Tensor]) -> dict[str, Any]:
    trainer = build_trainer(args, batches)
    state = trainer.states[0]
    timer = PhaseTimer(args.device)
    totals: list[float] = []
    faults: list[int] = []
    per_phase: dict[str, list[float]] = defaultdict(list)
    faults_per_phase: dict[str, list[int]] = defaultdict(list)
    with phases_timed(trainer, timer):
        for i in range(args.warmup + args.steps):
            x_BD = batches[i % len(batches)]
            _sync(args.device)
            faults_before, start = _page_faults(), time.perf_counter()
            trainer._train_step(state, x_BD)
            _sync(args.device)
            elapsed = time.perf_counter() - start
            step_faults = _page_faults() - faults_before
            trainer.step += 1
            phases, phase_faults = timer.take()
            if i < args.warmup:
                continue
            totals.append(elapsed)
            faults.append(step_faults)
            phases["other"] = elapsed - sum(phases.values())
            phase_faults["other"] = step_faults - sum(phase_faults.values())
            for name, seconds in phases.items():
                per_phase[name].append(seconds)
                faults_per_phase[name].append(phase_faults[name])
    if args.profile:
        profile_steps(trainer, batches)
    step_s = statistics.median(totals)
    return {
        "vectors_per_s": args.batch_size / step_s,
        "ms_per_step": step_s * 1e3,
        "ms_per_step_min": min(totals) * 1e3,
        "breakdown_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in per_phase.items()},
        # Fresh memory costs a page fault per 4 KiB touched, which is slow inside a VM.
        "page_faults_per_step": int(statistics.median(faults)),
        "page_faults_breakdown": {
            k: int(statistics.median(v)) for k, v in faults_per_phase.items() if any(v)
        },
        "last_mse": state.last_losses.get("mse"),
        "l0": state.window.compute()["l0"],
    }


def profile_steps(trainer: Trainer, batches: list[torch.Tensor]) -> None:
    from torch.profiler import ProfilerActivity, profile

    state = trainer.states[0]
    on_gpu = batches[0].device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for x_BD in batches[:2]:
            trainer._train_step(state, x_BD)
        _sync(str(batches[0].device))
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    print(table, file=sys.stderr)


# ----- peers: the same step in other libraries ----------------------------------------------------


def _median_step_s(step: Callable[[torch.Tensor], None], args, batches) -> float:
    totals = []
    for i in range(args.warmup + args.steps):
        _sync(args.device)
        start = time.perf_counter()
        step(batches[i % len(batches)])
        _sync(args.device)
        if i >= args.warmup:
            totals.append(time.perf_counter() - start)
    return statistics.median(totals)


def time_saelens(args: argparse.Namespace, batches: list[torch.Tensor]) -> float | str:
    """SAELens' ``SAETrainer._train_step``: forward, firing stats, backward, clip, Adam."""
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError as exc:
        return f"not importable: {exc}"
    d_sae = args.d_in * args.expansion
    if args.arch == "topk":
        cfg = TopKTrainingSAEConfig(
            d_in=args.d_in, d_sae=d_sae, k=args.k, rescale_acts_by_decoder_norm=False
        )
        sae = TopKTrainingSAE(cfg)
        coefficients: dict[str, float] = {}
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=d_sae))
        coefficients = {"l1": 5.0}
    sae.to(args.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired_F = torch.zeros(d_sae, device=args.device)
    dead_F = torch.zeros(d_sae, dtype=torch.bool, device=args.device)

    def step(x_BD: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x_BD,
                coefficients=coefficients,
                dead_neuron_mask=dead_F,
                n_training_steps=1_000,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            did_fire_F = out.feature_acts.bool().float().sum(-2).bool()
            since_fired_F.add_(1)
            since_fired_F[did_fire_F] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return _median_step_s(step, args, batches)


def time_sparsify(args: argparse.Namespace, batches: list[torch.Tensor]) -> float | str:
    """EleutherAI sparsify's TopK step: its ``FusedEncoder``, embedding_bag decoder, FVU loss,
    decoder-gradient projection, Adam and unit-norm decoder (its trainer's dead-feature count).

    ``import sparsify`` pulls its whole trainer (simple_parsing, natsort, schedulefree, …), so the
    kernel module is loaded from the installed package by path; it imports only torch.
    """
    if args.arch != "topk":
        return "sparsify trains TopK SAEs only"
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not spec.submodule_search_locations:
        return "not installed (pip install --no-deps eai-sparsify)"
    path = f"{list(spec.submodule_search_locations)[0]}/fused_encoder.py"
    try:
        kernel_spec = importlib.util.spec_from_file_location("_sparsify_fused_encoder", path)
        fused = importlib.util.module_from_spec(kernel_spec)
        kernel_spec.loader.exec_module(fused)
    except (ImportError, FileNotFoundError) as exc:
        return f"fused_encoder not loadable: {exc}"
    d_sae = args.d_in * args.expansion
    device = args.device
    W_enc_FD = torch.nn.Parameter(torch.randn(d_sae, args.d_in, device=device) / args.d_in**0.5)
    b_enc_F = torch.nn.Parameter(torch.zeros(d_sae, device=device))
    W_dec_FD = torch.nn.Parameter(W_enc_FD.detach().clone())
    b_dec_D = torch.nn.Parameter(torch.zeros(args.d_in, device=device))
    params = [W_enc_FD, b_enc_F, W_dec_FD, b_dec_D]
    opt = torch.optim.Adam(params, lr=1e-4)
    since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)

    def step(x_BD: torch.Tensor) -> None:
        top_acts, top_idx, _ = fused.fused_encoder(
            x_BD - b_dec_D, W_enc_FD, b_enc_F, args.k, "topk"
        )
        recon_BD = torch.nn.functional.embedding_bag(
            top_idx, W_dec_FD, per_sample_weights=top_acts, mode="sum"
        )
        recon_BD = recon_BD + b_dec_D
        fvu = (x_BD - recon_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
        fvu.backward()
        with torch.no_grad():
            since_fired_F.add_(x_BD.shape[0])
            since_fired_F[top_idx.flatten()] = 0
            grad = W_dec_FD.grad
            grad.sub_((grad * W_dec_FD).sum(-1, keepdim=True) * W_dec_FD)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            W_dec_FD.div_(W_dec_FD.norm(dim=1, keepdim=True) + torch.finfo(W_dec_FD.dtype).eps)

    return _median_step_s(step, args, batches)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    batches = make_batches(args)
    ours = time_saelab(args, batches)
    result: dict[str, Any] = {
        "arch": args.arch,
        "d_in": args.d_in,
        "d_sae": args.d_in * args.expansion,
        "k": args.k if args.arch == "topk" else None,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bf16_encoder": args.bf16_encoder,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "autocast_bf16": args.autocast_bf16,
        "l0": ours.pop("l0"),
        **ours,
        "torch": torch.__version__,
    }
    if args.peers:
        for peer, timer in (("saelens", time_saelens), ("sparsify", time_sparsify)):
            peer_s = timer(args, batches)
            if isinstance(peer_s, str):
                result[f"{peer}_skipped"] = peer_s
                continue
            result[f"{peer}_vectors_per_s"] = args.batch_size / peer_s
            result[f"ratio_vs_{peer}"] = ours["vectors_per_s"] * peer_s / args.batch_size
    for key, value in result.items():
        if isinstance(value, float):
            result[key] = round(value, 4 if key.startswith("ratio") else 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
