"""``saelab steer``: build (or load) a vector, sweep coefficients, score, generate, transfer.

Writes into ``out``: ``vector/`` (the vector, reusable with ``--vector``), ``steer.json`` (the
configuration, the vector's metadata, one sweep row per coefficient, generations, transfer) and
``steer.png`` (effect and cost against the coefficient).

Example:
    >>> cfg = SteerConfig(build=SteerVectorConfig(method="caa", pairs="pairs.jsonl"),
    ...                   coefs=(-4.0, 0.0, 4.0), generate=("I think",))
    >>> result = run_steer(cfg, "runs/steer")
    >>> print(format_sweep_table(result))
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from saelab.analysis.steering.apply import (
    Steering,
    check_positions,
    default_positions,
    generate,
)
from saelab.analysis.steering.build import build_vector
from saelab.analysis.steering.config import SteerConfig
from saelab.analysis.steering.data import ContrastPair, TextRows, read_pairs, read_text_rows
from saelab.analysis.steering.explain import explain_with
from saelab.analysis.steering.plot import plot_steer
from saelab.analysis.steering.score import EFFECT_KEY, SWEEP_KEYS, sweep
from saelab.analysis.steering.transfer import layer_transfer, model_transfer
from saelab.analysis.steering.vectors import (
    SteeringVector,
    check_fits,
    load_vector,
    save_vector,
)
from saelab.atomic import write_json
from saelab.errors import SaelabError
from saelab.evaluation.transfer import parse_layers
from saelab.models.loading import load_model

log = logging.getLogger(__name__)

RESULT_FILENAME = "steer.json"
PLOT_FILENAME = "steer.png"
VECTOR_DIRNAME = "vector"


def _eval_pairs(cfg: SteerConfig) -> tuple[list[ContrastPair] | None, dict[str, Any] | None]:
    """The scored pairs and where they came from: ``--eval``, else a CAA run's own pairs."""
    if cfg.eval is not None:
        pairs = read_pairs(cfg.eval)
        return pairs, {"file": cfg.eval, "pairs": len(pairs), "in_sample": False}
    if cfg.build is not None and cfg.build.method == "caa":
        pairs = read_pairs(cfg.build.pairs)
        return pairs, {"file": cfg.build.pairs, "pairs": len(pairs), "in_sample": True}
    return None, None


def _vector(cfg: SteerConfig, model, tokenizer) -> SteeringVector:
    if cfg.vector is None:
        return build_vector(model, tokenizer, cfg.build, model_name=cfg.model)
    vector = load_vector(cfg.vector, device=cfg.device)
    check_fits(model, vector)
    if vector.model != cfg.model:
        log.warning("the vector was built on %s and is applied to %s", vector.model, cfg.model)
    return vector


def _generations(
    cfg: SteerConfig, model, tokenizer, vector: SteeringVector, positions: str
) -> list[dict[str, Any]]:
    """Each ``--generate`` prompt continued at each coefficient."""
    options = {
        "max_new_tokens": cfg.max_new_tokens,
        "sample": cfg.sample,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "seed": cfg.seed,
    }
    return [
        {
            "prompt": prompt,
            "coef": coef,
            "text": generate(
                model, tokenizer, prompt, Steering(vector, coef, positions), **options
            ),
        }
        for prompt in cfg.generate
        for coef in cfg.coefs
    ]


def _transfer(
    cfg: SteerConfig,
    model,
    tokenizer,
    other: tuple | None,
    vector: SteeringVector,
    positions: str,
    pairs: list[ContrastPair] | None,
    reference: list[float],
) -> dict[str, Any]:
    """``layers`` and/or ``model`` transfer, as asked; ``reference`` is the effect here."""
    transfer: dict[str, Any] = {}
    if cfg.transfer_layers:
        transfer["layers"] = layer_transfer(
            model,
            tokenizer,
            vector,
            parse_layers(cfg.transfer_layers),
            cfg.coefs,
            pairs,
            positions=positions,
            reference=reference,
        )
    if other is not None:
        transfer["model"] = model_transfer(
            *other,
            vector,
            cfg.coefs,
            pairs,
            reference=reference,
            positions=positions,
            model_name=cfg.transfer_model,
        )
    return transfer


def run_steer(cfg: SteerConfig, out: str | Path = "runs/steer", progress: bool = True) -> dict:
    """Run the whole job and write its files (see the module doc); returns ``steer.json``'s
    content."""
    out = Path(out)
    pairs, eval_info = _eval_pairs(cfg)
    if (cfg.transfer_layers or cfg.transfer_model) and not pairs:
        raise SaelabError(
            "transfer compares the effect on scored completions; pass --eval FILE.jsonl "
            "(prompt, target, contrast)"
        )
    if cfg.transfer_layers:
        parse_layers(cfg.transfer_layers)  # a malformed list fails before any work
    model, tokenizer = load_model(cfg.model, device=cfg.device)
    vector = _vector(cfg, model, tokenizer)
    other = None
    if cfg.transfer_model:  # loaded before the sweep, so a width mismatch fails at once
        other = load_model(cfg.transfer_model, device=cfg.device)
        check_fits(other[0], vector)
    save_vector(vector, out / VECTOR_DIRNAME)
    positions = cfg.positions or default_positions(vector)
    check_positions(vector, positions)
    neutral = None
    if cfg.neutral_tokens:
        neutral = read_text_rows(
            cfg.neutral, tokenizer, tokens=cfg.neutral_tokens, context=cfg.context, seed=cfg.seed
        )
    rows = sweep(
        model,
        tokenizer,
        vector,
        cfg.coefs,
        pairs=pairs,
        neutral=neutral,
        positions=positions,
        progress=progress,
    )
    generations = _generations(cfg, model, tokenizer, vector, positions)
    reference = [row[EFFECT_KEY] for row in rows]
    transfer = _transfer(cfg, model, tokenizer, other, vector, positions, pairs, reference)
    explanation = None
    if cfg.explain_with is not None:
        explanation = explain_with(
            vector.vector,
            cfg.explain_with,
            model,
            tokenizer,
            hook=vector.hook,
            top=cfg.explain_top,
            general=cfg.neutral,
            context=cfg.context,
            seed=cfg.seed,
        )
    result = steer_result(
        model=cfg.model,
        vector=vector,
        positions=positions,
        rows=rows,
        eval_info=eval_info,
        neutral=neutral,
        generations=generations,
        transfer=transfer,
        vector_dir=out / VECTOR_DIRNAME,
        config=dataclasses.asdict(cfg),
    )
    if explanation is not None:
        result["explain"] = explanation
    write_steer_result(result, out)
    log.info("steering results written to %s", out)
    return result


def steer_result(
    *,
    model: str,
    vector: SteeringVector,
    positions: str,
    rows: list[dict[str, Any]],
    eval_info: dict[str, Any] | None = None,
    neutral: TextRows | None = None,
    generations: Sequence[dict[str, Any]] = (),
    transfer: dict[str, Any] | None = None,
    vector_dir: str | Path | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``steer.json`` (what :func:`plot_steer` and the tables read)."""
    return {
        "model": model,
        "hook": vector.hook,
        "positions": positions,
        "vector": {**vector.metadata(), "dir": None if vector_dir is None else str(vector_dir)},
        "eval": eval_info,
        "neutral": None
        if neutral is None
        else {"source": neutral.source, "tokens": neutral.n_tokens},
        "keys": SWEEP_KEYS,
        "sweep": rows,
        "generations": list(generations),
        "transfer": transfer or {},
        "config": config,
    }


def write_steer_result(result: dict[str, Any], out: str | Path) -> Path:
    """``out/steer.json`` and ``out/steer.png``, each written atomically; returns ``out``."""
    out = Path(out)
    write_json(out / RESULT_FILENAME, result)
    plot_steer(result, out / PLOT_FILENAME)
    return out


def _cell(value: float | None, width: int = 12) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.4g}"


def format_sweep_table(result: dict[str, Any]) -> str:
    """One row per coefficient, one column per key of ``SWEEP_KEYS``."""
    widths = {k: max(10, len(k)) for k in result["keys"]}
    lines = [f"{'coef':>8}" + "".join(f"  {k:>{w}}" for k, w in widths.items())]
    for row in result["sweep"]:
        cells = "".join(f"  {_cell(row[k], w)}" for k, w in widths.items())
        lines.append(f"{row['coef']:>8.4g}{cells}")
    return "\n".join(lines)


def format_transfer_tables(result: dict[str, Any]) -> str:
    """Effect retained per layer (and on the other model), one column per coefficient."""
    transfer = result.get("transfer") or {}
    blocks = []
    for key, label in (("layers", "layer"), ("model", "model")):
        if key not in transfer:
            continue
        part = transfer[key]
        header = f"{'retained at ' + label:<28}" + "".join(
            f"  {f'c={c:g}':>10}" for c in part["coefs"]
        )
        lines = [header]
        entries = (
            [
                (f"L{c['layer']}" + ("*" if c["layer"] == part["own_layer"] else ""), c["retained"])
                for c in part["cells"]
            ]
            if key == "layers"
            else [(part["model"], part["retained"])]
        )
        for name, values in entries:
            lines.append(f"{name:<28}" + "".join(f"  {_cell(v, 10)}" for v in values))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_generations(result: dict[str, Any]) -> str:
    """Each prompt, then its continuation at each coefficient."""
    lines: list[str] = []
    for prompt in dict.fromkeys(g["prompt"] for g in result["generations"]):
        lines.append(f"prompt: {prompt!r}")
        for g in result["generations"]:
            if g["prompt"] == prompt:
                lines.append(f"  c={g['coef']:>+7.3g}: {g['text']!r}")
    return "\n".join(lines)
