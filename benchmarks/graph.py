"""Attribution-graph time and peak memory against prompt length, with the bound that explains them.

For each prompt length (tokens with BOS; the prompt is a fixed English text cut to length) one
child process loads the model and the replacement set, builds the graph as ``saelab graph``
does (``build_graph`` + ``prune`` + scores) and reports its wall time, CPU time, peak resident
memory above what the loaded model and set already took, and the graph's size. In the same
child the bound is measured: one backward row, i.e. a batched frozen forward + backward of
``--batch-size`` logit targets (through every layer) divided by the batch size, in wall and CPU
time. ``rows × row_cpu_s`` bounds what the batched backward passes cost (a feature row of layer
L stops after L, so it costs less); ``cpu_ratio_to_rows_bound = cpu_s / (rows × row_cpu_s)``
at or below 1 says the graph costs no more than its rows (CPU time, because wall time on a shared
machine measures the neighbours). Memory: the peak resident memory during the build above what
it started at, next to the dense rows' size ``rows × columns × 4`` bytes.
Prints one JSON line per length and a summary of how both grow.

Example::

    python benchmarks/graph.py runs/replacement-30 --lengths 8 16 32 64
    python benchmarks/graph.py runs/replacement-small --lengths 8 16 --max-features 200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time

TEXT = (
    "The function returns a list of the values that the user passed to it, sorted by their "
    "keys, so that the caller can iterate over them in order without having to sort them "
    "again. When the list is empty the function returns None instead, which callers must "
    "check before they use the result in a loop or pass it on to another function."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("replacement", help="replacement set folder")
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--max-features", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--target-logits", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mb() -> float:
    """Resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """The highest resident memory seen while the ``with`` block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def child(args: argparse.Namespace) -> dict:
    """Build one graph at prompt length ``args.child`` and measure it."""
    import torch

    from saelab.analysis.graphs.build import LocalReplacement, Target, build_graph
    from saelab.analysis.graphs.prune import prune, scores_with_pruning
    from saelab.models.loading import bos_token_id, load_model
    from saelab.saes.replacement import load_replacement

    rep = load_replacement(args.replacement, device=args.device)
    model, tokenizer = load_model(rep.model, device=args.device)
    ids = [bos_token_id(tokenizer), *tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    ids = ids[: args.child]
    input_ids = torch.tensor([ids], device=args.device)
    prompt = tokenizer.decode(ids[1:])

    # The bound: one batch of logit rows, after a warm-up batch.
    local = LocalReplacement(model, rep, input_ids)
    targets = [Target("logit", local.n_layers, len(ids) - 1, t) for t in range(args.batch_size)]
    local.rows(targets)
    start, start_cpu = time.perf_counter(), time.process_time()
    local.rows(targets)
    row_s = (time.perf_counter() - start) / args.batch_size
    row_cpu_s = (time.process_time() - start_cpu) / args.batch_size
    del local

    wall, cpu = time.perf_counter(), time.process_time()
    with PeakRss() as rss:
        graph = build_graph(
            model,
            tokenizer,
            rep,
            prompt,
            target_tokens=args.target_logits,
            max_features=args.max_features,
            batch_size=args.batch_size,
            input_ids=input_ids,
        )
        pruned = prune(graph)
        scores = scores_with_pruning(graph, pruned)
    graph_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    rows = graph.n_features + graph.n_logits
    cols = graph.n_active + graph.n_errors + graph.n_pos
    return {
        "tokens": len(ids),
        "layers_covered": len(rep.layers),
        "active_features": graph.n_active,
        "feature_nodes": graph.n_features,
        "rows": rows,
        "graph_s": round(graph_s, 2),
        "cpu_s": round(cpu_s, 2),
        "row_s": round(row_s, 4),
        "row_cpu_s": round(row_cpu_s, 4),
        "cpu_ratio_to_rows_bound": round(cpu_s / (rows * row_cpu_s), 2),
        "peak_extra_mb": round(rss.peak - rss.start, 1),
        "dense_rows_mb": round(rows * cols * 4 / 2**20, 1),
        "replacement_score": round(scores["replacement"], 4),
        "completeness_score": round(scores["completeness"], 4),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    results = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, args.replacement, "--child", str(length)]
        cmd += ["--max-features", str(args.max_features), "--batch-size", str(args.batch_size)]
        cmd += ["--target-logits", str(args.target_logits), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(line)
        print(json.dumps(line), flush=True)
    first = results[0]
    for r in results[1:]:
        grow = r["tokens"] / first["tokens"]
        print(
            f"{first['tokens']}→{r['tokens']} tokens (×{grow:g}): time ×"
            f"{r['graph_s'] / first['graph_s']:.2f} (CPU ×{r['cpu_s'] / first['cpu_s']:.2f}), row "
            f"cost ×{r['row_cpu_s'] / first['row_cpu_s']:.2f}, "
            f"rows ×{r['rows'] / first['rows']:.2f}, peak memory ×"
            f"{max(r['peak_extra_mb'], 1) / max(first['peak_extra_mb'], 1):.2f}, dense rows ×"
            f"{r['dense_rows_mb'] / max(first['dense_rows_mb'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
