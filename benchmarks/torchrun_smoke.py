"""``torchrun -m saelab train|sweep`` for real, on a tiny random Llama, checked against one process.

CI runs the gloo path on the CPU (``tests/e2e/test_distributed_cli.py``); this is the check to run
where there is a GPU, for the NCCL path (``--device cuda``: one process per GPU, so with one GPU
``--nproc 1``, a process group of one whose collectives still run through NCCL). Checks, one
JSON line each, then a summary line; exit status 1 if any failed:

* ``ddp_train``: ``torchrun --nproc-per-node N -m saelab train`` (data-parallel) finishes, its
  FVU falls, and with N = 1 its SAE equals a plain ``saelab train`` on the same batches;
* ``ddp_resume``: ``--resume`` from its mid-run checkpoint gives the same SAE: bit for bit on the
  CPU, to 1e-4 on CUDA (whose scatter-add kernels do not add in a fixed order);
* ``sae_sweep``: ``torchrun ... sweep --dist-mode sae`` (rank 0 runs the model and broadcasts
  its batches, each process trains its SAEs) gives the SAEs and summary of a plain sweep.

Example::

    python benchmarks/torchrun_smoke.py --device cuda --nproc 1 --work /tmp/torchrun-smoke
    python benchmarks/torchrun_smoke.py --device cpu --nproc 2     # gloo, 2 CPU processes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_models import VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
MLP = "blocks.0.hook_mlp_out"
FOLDER = f"{HOOK}-topk-x2-k4"
SWEEP_TOML = f"""
[train]
tokens = 3072
batch_size = 256
log_every_steps = 4

[data]
buffer_size = 1024
context = 16

[[sae]]
hook = "{HOOK}"
k = 4
expansion = 2

[[sae]]
hook = "{HOOK}"
architecture = "relu"
l1_coefficient = 1.0
expansion = 2

[[sae]]
hook = "{MLP}"
k = 4
expansion = 2
"""


def run(command: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def max_difference(a: Path, b: Path) -> float:
    x, y = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def report(checks: list[dict], name: str, ok: bool, **details) -> None:
    checks.append({"check": name, "ok": bool(ok), **details})
    print(json.dumps(checks[-1]), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per torchrun")
    p.add_argument("--work", help="folder for the model, text and runs (default: temporary)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="torchrun-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "tiny-llama"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    words = work / "words.txt"
    docs = [" ".join(f"w{rng.randrange(3, VOCAB_SIZE)}" for _ in range(400)) for _ in range(300)]
    words.write_text("\n\n".join(docs))

    saelab = [sys.executable, "-m", "saelab", "-q"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += [f"--nproc-per-node={args.nproc}", "-m", "saelab", "-q"]
    common = ["--model", str(model_dir), "--dataset", str(words), "--device", args.device]
    train = ["train", *common, "--hook", HOOK, "--k", "4", "--expansion", "2", "--context", "16"]
    train += ["--tokens", "5120", "--batch-size", "256", "--set", "data.buffer_size=1024"]
    train += ["--checkpoint-every", "3072"]
    checks: list[dict] = []

    done = run([*torchrun, *train, "--out", str(work / "ddp")], threads=1)
    single = run([*saelab, *train, "--out", str(work / "one")], threads=args.nproc)
    ok = done.returncode == 0 and single.returncode == 0
    details: dict = {"stderr": (done.stderr or single.stderr)[-1500:]} if not ok else {}
    if ok:
        log = (work / "ddp" / "train_log.jsonl").read_text().splitlines()
        first, last = json.loads(log[0]), json.loads(log[-1])
        details = {"fvu_first": first["fvu"], "fvu_last": last["fvu"], "steps": last["step"]}
        ok = last["fvu"] < first["fvu"] and last["tokens"] == 5120
        if args.nproc == 1:  # the same batches as one plain process
            diff = max_difference(work / "ddp" / FOLDER, work / "one" / FOLDER)
            details["max_abs_diff_vs_one_process"] = diff
            ok = ok and diff < 1e-4
    report(checks, "ddp_train", ok, nproc=args.nproc, device=args.device, **details)

    before = load_file(work / "ddp" / FOLDER / "sae_weights.safetensors") if ok else {}
    done = run([*torchrun, "train", "--out", str(work / "ddp"), "--resume"], threads=1)
    ok = done.returncode == 0 and bool(before)
    details = {"stderr": done.stderr[-1500:]} if not ok else {}
    if ok:
        after = load_file(work / "ddp" / FOLDER / "sae_weights.safetensors")
        diff = max(float((before[k].double() - after[k].double()).abs().max()) for k in before)
        details = {"max_abs_diff_vs_uninterrupted": diff}
        ok = diff == 0 if args.device == "cpu" else diff < 1e-4
    report(checks, "ddp_resume", ok, **details)

    config = work / "sweep.toml"
    config.write_text(SWEEP_TOML)
    sweep = ["sweep", str(config), "--device", args.device, "--eval-tokens", "512"]
    sweep += ["--set", f"model.name={model_dir}", "--set", f"data.dataset={words}"]
    done = run([*torchrun, *sweep, "--dist-mode", "sae", "--out", str(work / "sae")], threads=1)
    single = run([*saelab, *sweep, "--out", str(work / "sweep_one")], threads=args.nproc)
    ok = done.returncode == 0 and single.returncode == 0
    details = {} if ok else {"stderr": (done.stderr or single.stderr)[-1500:]}
    if ok:
        ours = json.loads((work / "sae" / "summary.json").read_text())["saes"]
        reference = json.loads((work / "sweep_one" / "summary.json").read_text())["saes"]
        diffs = [
            max_difference(work / "sae" / a["folder"], work / "sweep_one" / b["folder"])
            for a, b in zip(ours, reference, strict=True)
        ]
        fvu_gap = max(abs(a["fvu"] - b["fvu"]) for a, b in zip(ours, reference, strict=True))
        details = {"saes": len(ours), "max_abs_diff": max(diffs), "max_fvu_gap": fvu_gap}
        ok = len(ours) == 3 and max(diffs) < 1e-4 and fvu_gap < 1e-4
    report(checks, "sae_sweep", ok, **details)

    failed = [c["check"] for c in checks if not c["ok"]]
    summary = {"summary": "torchrun_smoke", "passed": len(checks) - len(failed)}
    print(json.dumps({**summary, "failed": failed, "torch": torch.__version__, "work": str(work)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
