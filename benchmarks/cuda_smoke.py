"""Every CUDA code path of the ``saelab`` command, run for real on a GPU, checked against the CPU.

CI has no GPU, so this is the check to run on a machine that has one. On a tiny random Llama
(built from a config, saved as a local model folder) and a text of random words it runs:

* ``saelab train --device cuda`` for every architecture, in float32 and with
  ``train.autocast_bf16``; each must end with a finite FVU below its first logged one;
* ``saelab eval`` of the same SAE on ``cuda`` and on ``cpu``: the metrics must agree;
* ``saelab cache --device cuda`` then ``saelab train --activations`` from that cache;
* ``saelab transfer --device cuda``.

Prints one JSON line per check and a summary line; exits 1 if any check failed.

Example::

    python benchmarks/cuda_smoke.py --work /tmp/cuda-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from saelab.saes.registry import ARCHITECTURES  # noqa: E402
from tiny_models import VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
TRANSCODER_FLAGS = [
    "--hook", "blocks.1.ln2.hook_normalized", "--output-hook", "blocks.1.hook_mlp_out",
]  # fmt: skip
METRICS_COMPARED = ("l0", "fvu", "ce_loss_clean", "ce_loss_spliced")


def saelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "saelab", "-q", *args], capture_output=True, text=True, check=False
    )


def report(name: str, ok: bool, **info: object) -> bool:
    print(json.dumps({"check": name, "ok": ok, **info}), flush=True)
    return ok


def build_inputs(work: Path) -> tuple[Path, Path]:
    model_dir = work / "tiny-llama"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(3, VOCAB_SIZE)}" for _ in range(400)) for _ in range(300)]
    text = work / "words.txt"
    text.write_text("\n\n".join(docs))
    return model_dir, text


def train(
    model_dir: Path, text: Path, out: Path, arch: str, device: str, *extra: str
) -> subprocess.CompletedProcess:
    hook_flags = TRANSCODER_FLAGS if "transcoder" in arch else ["--hook", HOOK]
    return saelab(
        "train", "--model", str(model_dir), "--dataset", str(text), "--device", device,
        "--arch", arch, "--tokens", "65536", "--batch-size", "512", "--context", "64",
        *hook_flags, "--out", str(out), *extra,
    )  # fmt: skip


def only_sae_dir(run: Path) -> Path:
    (cfg,) = [p.parent for p in run.glob("*/cfg.json")]
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/saelab-cuda-smoke", help="scratch folder")
    p.add_argument("--device", default="cuda", help="cpu only to try this script without a GPU")
    p.add_argument("--archs", help="comma-separated architectures (default: all)")
    args = p.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, text = build_inputs(work)
    results: list[bool] = []
    for arch in args.archs.split(",") if args.archs else sorted(ARCHITECTURES):
        for autocast in (False, True) if device == "cuda" else (False,):
            out = work / f"{arch}{'-bf16' if autocast else ''}"
            extra = ["--set", "train.autocast_bf16=true"] if autocast else []
            start = time.perf_counter()
            proc = train(model_dir, text, out, arch, device, *extra)
            seconds = round(time.perf_counter() - start, 1)
            if proc.returncode != 0:
                results.append(report(f"train {out.name}", False, stderr=proc.stderr[-600:]))
                continue
            lines = (out / "train_log.jsonl").read_text().splitlines()
            first, last = json.loads(lines[0]), json.loads(lines[-1])
            fvu = {k: (first[k], v) for k, v in last.items() if k.endswith("fvu")}
            # Short runs on a random model: the check is that it learns, not how well.
            fine = bool(fvu) and all(math.isfinite(b) and b < a for a, b in fvu.values())
            results.append(report(f"train {out.name}", fine, seconds=seconds, first_last=fvu))
            if autocast or "transcoder" in arch:
                continue
            sae_dir = only_sae_dir(out)
            metrics = {}
            for where in ("cuda", "cpu") if device == "cuda" else ("cpu",):
                proc = saelab("eval", str(sae_dir), "--tokens", "2048", "--device", where)
                if proc.returncode != 0:
                    metrics[where] = {"error": proc.stderr[-400:]}
                    continue
                metrics[where] = json.loads((sae_dir / "metrics.json").read_text())
            metrics.setdefault("cuda", metrics["cpu"])
            agree = all(
                isinstance(metrics[d].get(key), float) for d in metrics for key in METRICS_COMPARED
            ) and all(
                math.isclose(metrics["cuda"][key], metrics["cpu"][key], rel_tol=2e-3, abs_tol=1e-3)
                for key in METRICS_COMPARED
            )
            compared = {f"{d}_{k}": metrics[d].get(k) for d in metrics for k in METRICS_COMPARED}
            results.append(report(f"eval cuda vs cpu {arch}", agree, **compared))
    cache = work / "cache"
    proc = saelab(
        "cache", "--model", str(model_dir), "--dataset", str(text), "--hook", HOOK,
        "--tokens", "8192", "--context", "64", "--device", device, "--out", str(cache),
    )  # fmt: skip
    results.append(report("cache", proc.returncode == 0, stderr=proc.stderr[-400:]))
    proc = saelab(
        "train", "--activations", str(cache), "--device", device, "--arch", "topk", "--k", "8",
        "--tokens", "8192", "--batch-size", "512", "--hook", HOOK,
        "--out", str(work / "from-cache"),
    )  # fmt: skip
    results.append(report("train from cache", proc.returncode == 0, stderr=proc.stderr[-400:]))
    proc = saelab(
        "transfer", str(only_sae_dir(work / "topk")), "--layers", "0-2", "--tokens", "1024",
        "--device", device, "--out", str(work / "transfer"),
    )  # fmt: skip
    results.append(report("transfer", proc.returncode == 0, stderr=proc.stderr[-400:]))
    print(json.dumps({"passed": sum(results), "failed": len(results) - sum(results)}))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
