"""Steer SmolLM2-135M-Instruct towards weddings with a mean-centred vector, end to end.

The vector is the mean residual stream (layer 16) over a dozen sentences about weddings
(weddings.txt) minus the mean over a dozen matched everyday sentences (everyday.txt). A
coefficient sweep then measures how much the log-probability of wedding words (vs. everyday
words) after neutral prompts moves (wedding_words.jsonl), what it costs on neutral text (KL, CE
increase on the default corpus), and generates greedily at coefficient 0 and at the best
coefficient (the largest effect whose KL stays within --max-kl).

    python examples/steer_topic.py                 # about a minute on 2 CPU cores
    python examples/steer_topic.py --quick         # a smaller run (the e2e test)

Writes OUT/steer.json, OUT/steer.png and OUT/vector/ (default OUT: runs/steer_topic).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from saelab.analysis.steering import (
    Steering,
    generate,
    mean_centred_vector,
    read_pairs,
    read_text_rows,
    save_vector,
    sweep,
)
from saelab.analysis.steering.run import format_sweep_table, steer_result, write_steer_result
from saelab.models.loading import load_model

HOOK = "blocks.16.hook_resid_post"
HERE = Path(__file__).resolve().parent
WEDDING = HERE / "weddings.txt"
"""A dozen sentences about weddings, one per paragraph."""
EVERYDAY = HERE / "everyday.txt"
"""The same sentences about offices, taxes and shopping."""
WORDS = HERE / "wedding_words.jsonl"
"""(prompt, wedding word, everyday word) triples: 4 neutral prompts × 3 word pairs."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/steer_topic", help="output folder")
    p.add_argument("--quick", action="store_true", help="fewer coefficients, tokens and prompts")
    p.add_argument("--max-kl", type=float, default=1.0, help="KL budget of the best coefficient")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a busy CPU)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    coefs = [0.0, 2.0] if args.quick else [-2.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    neutral_tokens = 64 if args.quick else 512
    new_tokens = 10 if args.quick else 30

    model, tokenizer = load_model("default")
    vector = mean_centred_vector(model, tokenizer, str(WEDDING), HOOK, general=str(EVERYDAY))
    pairs = read_pairs(WORDS)[: 3 if args.quick else None]
    prompts = list(dict.fromkeys(pair.prompt for pair in pairs))
    neutral = read_text_rows("default", tokenizer, tokens=neutral_tokens, context=128)
    rows = sweep(model, tokenizer, vector, coefs, pairs=pairs, neutral=neutral)

    within = [row for row in rows if row["coef"] > 0 and row["kl"] <= args.max_kl]
    best = max(within or rows, key=lambda row: row["delta_logit_diff"])["coef"]
    generations = [
        {
            "prompt": prompt,
            "coef": coef,
            "text": generate(
                model, tokenizer, prompt, Steering(vector, coef), max_new_tokens=new_tokens
            ),
        }
        for prompt in prompts[:3]
        for coef in (0.0, best)
    ]
    save_vector(vector, f"{args.out}/vector")
    result = steer_result(
        model="default",
        vector=vector,
        positions="all",
        rows=rows,
        eval_info={"file": str(WORDS), "pairs": len(pairs), "in_sample": False},
        neutral=neutral,
        generations=generations,
        vector_dir=f"{args.out}/vector",
        config={"best_coef": best, "max_kl": args.max_kl, "quick": args.quick},
    )
    write_steer_result(result, args.out)

    print(f"mean-centred vector at {HOOK}: norm {vector.norm:.2f}")
    print(format_sweep_table(result))
    print(f"best coefficient (largest effect with KL <= {args.max_kl}): {best:g}")
    for g in generations:
        print(f"c={g['coef']:g} {g['prompt']!r} -> {g['text']!r}")
    print(f"steer.json, steer.png and vector/ in {args.out}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
