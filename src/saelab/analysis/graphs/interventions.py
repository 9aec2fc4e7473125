"""Interventions from a graph: edit features in the unfrozen model, compare with the graph.

The edited model is the real model (attention and norms live) whose MLP output at each covered
layer and prompt position is the replacement's output from the features read *in this run*,
with the edited ones set, plus the clean run's error term: with no edit it computes the clean
model exactly. Positions the transcoders do not run at (BOS, generated tokens) and uncovered
layers keep their real MLP.

The graph's prediction is linear: an edit changes the feature's activation by ``δ``; every other
selected feature changes by the sum of its incoming edges' change (edges scale with their source,
``edge / a_s`` per unit), errors and embeddings stay; the target logits change by their incoming
edges' change. It holds while downstream features stay in their linear (active) region and
attention patterns do not move.

Example:
    >>> edits = parse_edits(ablate=("3:5:120",))
    >>> predicted = predicted_change(graph, edits)      # [n_logits]
    >>> measured = measured_change(model, replacement, graph, edits)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from saelab.analysis.graphs.build import Graph
from saelab.analysis.graphs.frozen import _mlp_modules, _replaced_forward
from saelab.errors import SaelabError
from saelab.saes.replacement import Replacement

_SPEC = re.compile(r"^\s*(\d+):(\d+):(\d+)\s*(?:=\s*([-+0-9.eE]+)\s*)?$")


@dataclass(frozen=True)
class FeatureEdit:
    """One feature at one position set to a new activation."""

    layer: int
    pos: int
    feature: int
    op: str
    """``ablate`` (to 0), ``scale`` (times ``value``) or ``clamp`` (to ``value``)."""
    value: float = 0.0

    def new(self, activation: float) -> float:
        if self.op == "ablate":
            return 0.0
        if self.op == "scale":
            return activation * self.value
        return self.value

    def __str__(self) -> str:
        name = f"{self.layer}:{self.pos}:{self.feature}"
        return {"ablate": f"ablate {name}", "scale": f"scale {name}×{self.value:g}"}.get(
            self.op, f"clamp {name}={self.value:g}"
        )


def parse_edits(
    ablate: Sequence[str] = (), scale: Sequence[str] = (), clamp: Sequence[str] = ()
) -> list[FeatureEdit]:
    """``--ablate L:POS:ID[,...]``, ``--scale L:POS:ID=F``, ``--clamp L:POS:ID=V`` as edits;
    one-line errors for anything else."""
    edits = []
    for op, specs in (("ablate", ablate), ("scale", scale), ("clamp", clamp)):
        for spec in (s for text in specs for s in text.split(",") if s.strip()):
            match = _SPEC.match(spec)
            if match is None or (op == "ablate") != (match.group(4) is None):
                form = "L:POS:ID" if op == "ablate" else "L:POS:ID=" + "FV"[op == "clamp"]
                raise SaelabError(
                    f"--{op} {spec!r} is not {form}; e.g. --{op} 3:5:120"
                    + ("" if op == "ablate" else "=2")
                )
            layer, pos, feature = (int(match.group(i)) for i in (1, 2, 3))
            value = float(match.group(4)) if match.group(4) else 0.0
            edits.append(FeatureEdit(layer, pos, feature, op, value))
    return edits


def check_edit_bounds(replacement: Replacement, n_pos: int, edits: Sequence[FeatureEdit]) -> None:
    """One-line errors for an edit at an uncovered layer, a position outside the prompt or an
    unknown feature id (checks that need no graph, made before building it)."""
    for e in edits:
        name = f"{e.layer}:{e.pos}:{e.feature}"
        if e.layer not in replacement.layers:
            raise SaelabError(
                f"--{e.op} {name}: layer {e.layer} is not covered by the replacement set "
                f"(layers {replacement.layers[0]}..{replacement.layers[-1]})"
            )
        if not 0 < e.pos < n_pos:
            raise SaelabError(
                f"--{e.op} {name}: position {e.pos} is not a feature position of the prompt "
                f"(1..{n_pos - 1}; 0 is BOS)"
            )
        if e.feature >= replacement.d_sae(e.layer):
            raise SaelabError(
                f"--{e.op} {name}: unknown feature {e.feature}; layer {e.layer} has "
                f"{replacement.d_sae(e.layer)} features"
            )


def check_edits(graph: Graph, replacement: Replacement, edits: Sequence[FeatureEdit]) -> None:
    """:func:`check_edit_bounds`, and a one-line error for a feature that is not a node of the
    graph (the graph cannot predict its edit)."""
    check_edit_bounds(replacement, graph.n_pos, edits)
    for e in edits:
        if graph.feature_index(e.layer, e.pos, e.feature) is None:
            raise SaelabError(
                f"--{e.op} {e.layer}:{e.pos}:{e.feature}: feature {e.feature} is not a node of "
                f"the graph at layer {e.layer}, position {e.pos} (inactive there, or left out "
                "by --max-features); pick one from graph.json"
            )


def predicted_change(graph: Graph, edits: Sequence[FeatureEdit]) -> Tensor:
    """``[n_logits]`` the graph's linear prediction of the change of each de-meaned target logit."""
    n_f = graph.n_features
    acts = graph.activations.double()
    A = graph.adjacency.double()
    per_unit = A[:, :n_f] / acts.clamp_min(1e-300)  # effect per unit of each source feature
    fixed = torch.zeros(n_f, dtype=torch.bool)
    delta0 = torch.zeros(n_f, dtype=torch.float64)
    for e in edits:
        i = graph.feature_index(e.layer, e.pos, e.feature)
        delta0[i] = e.new(float(acts[i])) - float(acts[i])
        fixed[i] = True
    delta = delta0.clone()
    M = per_unit[:n_f]
    for _ in range(graph.n_layers + 2):  # acyclic: converges within the depth
        delta = torch.where(fixed, delta0, M @ delta)
    return per_unit[graph.logit_index(0) :] @ delta


@contextmanager
def edited_model(
    model: PreTrainedModel,
    replacement: Replacement,
    errors: dict[int, Tensor],
    n_prompt: int,
    edits: Sequence[FeatureEdit] = (),
    skip_positions: int = 1,
) -> Iterator[None]:
    """Inside: ``model`` with every covered MLP replaced (module docstring) and ``edits``
    applied. ``errors``: ``{layer: [P, d]}`` clean error terms of the prompt's positions."""
    acts: dict[int, Tensor] = {}
    modules = _mlp_modules(model)

    def forward_for(layer: int, module):
        original = type(module).forward

        def forward(x: Tensor, *args, **kwargs) -> Tensor:
            real = original(module, x, *args, **kwargs)
            P = min(x.shape[1], n_prompt)
            a = replacement.encode(layer, x[:, :P]).to(x.dtype)
            a[:, :skip_positions] = 0
            for e in edits:
                if e.layer == layer and e.pos < P:
                    a[:, e.pos, e.feature] = e.new(float(a[0, e.pos, e.feature]))
            acts[layer] = a
            y = replacement.b_dec(layer).to(x.dtype).expand_as(x[:, :P]).clone()
            for src in replacement.layers:
                if src > layer:
                    break
                W = replacement.decoder(src, layer)
                if W is not None:
                    y = y + acts[src] @ W.to(x.dtype)
            W_skip = replacement.skip(layer)
            if W_skip is not None:
                y = y + x[:, :P] @ W_skip.T.to(x.dtype)
            y = y + errors[layer][:P].to(x.dtype)
            out = real.clone()
            out[:, skip_positions:P] = y[:, skip_positions:]
            return out

        return forward

    with ExitStack() as stack:
        for layer in replacement.layers:
            stack.enter_context(
                _replaced_forward(modules[layer], forward_for(layer, modules[layer]))
            )
        yield


def demeaned(logits: Tensor, tokens: Sequence[int]) -> Tensor:
    """``[n]`` the last position's logits of ``tokens`` minus the mean logit."""
    last = logits[0, -1].double()
    return last[list(tokens)] - last.mean()


@torch.no_grad()
def measured_change(
    model: PreTrainedModel,
    replacement: Replacement,
    graph: Graph,
    errors: dict[int, Tensor],
    edits: Sequence[FeatureEdit],
) -> tuple[Tensor, Tensor]:
    """``(change, baseline)`` of the de-meaned target logits in the unfrozen model with the edits
    (baseline: the same replacement run without edits, which is the clean model)."""
    ids = torch.tensor([graph.input_ids], device=next(model.parameters()).device)
    with edited_model(model, replacement, errors, len(graph.input_ids)):
        base = model(ids, use_cache=False).logits
    with edited_model(model, replacement, errors, len(graph.input_ids), edits):
        edited = model(ids, use_cache=False).logits
    tokens = graph.logit_tokens
    return demeaned(edited, tokens) - demeaned(base, tokens), demeaned(base, tokens)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    replacement: Replacement,
    graph: Graph,
    errors: dict[int, Tensor],
    edits: Sequence[FeatureEdit],
    n_tokens: int,
) -> list[int]:
    """``n_tokens`` greedy continuation ids with the edits applied at the prompt's positions
    (recomputed from scratch each step, so every step sees the edited prompt)."""
    ids = torch.tensor([graph.input_ids], device=next(model.parameters()).device)
    new: list[int] = []
    with edited_model(model, replacement, errors, len(graph.input_ids), edits):
        for _ in range(n_tokens):
            logits = model(ids, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, ids.new_tensor([[nxt]])], dim=1)
    return new
