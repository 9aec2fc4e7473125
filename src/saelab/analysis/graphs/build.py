"""Attribution graphs: direct effects between features, error terms, tokens and logits.

The local replacement model at a prompt (Ameisen et al. 2025) is the frozen model of
:mod:`~saelab.analysis.graphs.frozen` whose MLP output at every layer ``L`` and position ``p`` is
a constant *write*

    W[L, p] = b_dec(L) + Σ_{src ≤ L} Σ_f a[src, p, f] · decoder(src, L)[f] + ε[L, p]

(plus a skip transcoder's ``x_in W_skipᵀ``, which stays a live linear path), with ``a`` the
transcoders' activations on the clean MLP inputs and ``ε`` the error node: the clean MLP output
minus the transcoder's. At position 0 (BOS, which transcoders are not trained on) and at layers
the set does not cover, the whole MLP output is the error node. The model is then affine in the
input embeddings and the writes, so every target (a feature's pre-activation, a de-meaned logit)
is exactly the sum of its incoming edges plus a constant (biases: ``b_enc``, ``b_dec``, position
embeddings, norm and projection biases):

    edge(s → t) = a_s · (decoder row of s · ∂t/∂W at s's write location)      (features)
    edge(ε → t) = ε · ∂t/∂W,  edge(token p → t) = embedding_p · ∂t/∂embedding_p

The gradients come from batched backward passes (one prompt copy per target in a batch), with
the MLPs cut: only the residual stream and the frozen attention and norms lie between a write
and a target.

Nodes, in adjacency order: selected features (sorted by layer, position, id), one error node per
(layer, position), one embedding node per position, the target logits. ``adjacency[t, s]`` is the
edge from ``s`` to ``t``. With ``max_features`` below the number of active features, features are
selected greedily by their influence on the logits (estimated from the rows computed so far, as
the paper's implementation does); a feature left out is folded into the error node of the layer
and position it is read at, so the identities above still hold exactly.

Memory: where it fits in ``max_adjacency_mb``, the rows computed are kept dense, ``(selected +
logits) × (active features + layers · positions + positions)`` float32 numbers, and features are
selected greedily by influence. Otherwise the graph is chunked: the features are chosen up front
by their direct effect on the logits and each batch of rows is folded to ``selected + layers ·
positions + positions`` columns as it is computed; only a graph too big even so is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from saelab.analysis.graphs.frozen import CleanRun, frozen_model, record_clean
from saelab.errors import SaelabError
from saelab.models.hookpoints import n_layers as model_layers
from saelab.saes.replacement import Replacement


class _Stop(Exception):
    """Ends a frozen forward pass after the deepest layer a batch of feature targets reads."""


@dataclass(frozen=True)
class Target:
    """What one row of the adjacency measures: a feature's pre-activation or a de-meaned logit."""

    kind: str
    """``"feature"`` or ``"logit"``."""
    layer: int
    """The feature's layer (logit: the number of layers)."""
    pos: int
    index: int
    """Feature id, or token id of the logit."""


@dataclass
class Graph:
    """An attribution graph: nodes in adjacency order and the dense adjacency ``[N, N]``."""

    prompt: str
    input_ids: list[int]
    n_layers: int
    layers: list[int]
    """The layers the replacement set covers."""
    features: Tensor
    """``[n_f, 3]`` (layer, position, feature id) of the selected features."""
    activations: Tensor
    """``[n_f]`` their activations."""
    error_norms: Tensor
    """``[n_layers, P]`` the norm of each error node's vector (the MLP error alone)."""
    logit_tokens: list[int]
    logit_probs: Tensor
    """``[n_l]`` probabilities of the target logits at the last position."""
    logit_values: Tensor
    """``[n_l]`` the de-meaned logits (what the logit rows attribute)."""
    adjacency: Tensor
    """``[N, N]`` float32: ``adjacency[t, s]`` is the direct effect of ``s`` on ``t``."""
    values: Tensor
    """``[N]`` what each row attributes (features: pre-activation; logits: de-meaned logit;
    errors and tokens: 0)."""
    biases: Tensor | None = None
    """``[N]`` each row's constant term, from a forward pass of the frozen model with every
    source at zero (only when built with ``biases=True``)."""
    n_active: int = 0
    """Active features at the prompt (non-BOS positions), selected or not."""
    kind: str = "per_layer"
    errors: dict[int, Tensor] = field(default_factory=dict)
    """``{layer: [P, d]}`` the error terms of the covered layers (interventions keep them)."""

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, i: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + i

    def feature_index(self, layer: int, pos: int, feature: int) -> int | None:
        """The node index of a selected feature, or None."""
        hit = (
            (self.features[:, 0] == layer)
            & (self.features[:, 1] == pos)
            & (self.features[:, 2] == feature)
        ).nonzero()
        return int(hit[0, 0]) if len(hit) else None

    @property
    def logit_weights(self) -> Tensor:
        """``[N]``: the target logits' probabilities, zero elsewhere (influence's weights)."""
        w = torch.zeros(self.adjacency.shape[0], dtype=torch.float64)
        w[self.logit_index(0) :] = self.logit_probs.double()
        return w


# ----- the local replacement model ------------------------------------------------------------


class LocalReplacement:
    """The frozen replacement model at one prompt: its node values and batched gradients.

    ``writes()`` rebuilds every MLP write from its parts (``b_dec``, feature writes, errors);
    ``forward(targets, embeds, writes)`` evaluates targets in the frozen model;
    ``rows(targets)`` gives each target's direct effects from every source node.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        replacement: Replacement,
        input_ids: Tensor,
        *,
        skip_positions: int = 1,
    ) -> None:
        replacement.check_model(model)
        self.model = model
        self.rep = replacement
        self.n_layers = model_layers(model)
        self.clean: CleanRun = record_clean(model, input_ids)
        dtype = self.clean.embeds.dtype
        self.n_pos = input_ids.shape[1]
        covered = torch.zeros(self.n_pos, dtype=torch.bool, device=input_ids.device)
        covered[skip_positions:] = True
        self.covered_P = covered
        """Positions the transcoders run at (all but BOS)."""
        self.acts: dict[int, Tensor] = {}
        """``{layer: [P, F]}`` feature activations (zero at uncovered positions)."""
        self.skip_out: dict[int, Tensor] = {}
        for layer in replacement.layers:
            x = self.clean.mlp_in[layer][0]
            self.acts[layer] = replacement.encode(layer, x).to(dtype) * covered[:, None]
        recon = self._recon(self.acts)
        self.errors: dict[int, Tensor] = {}
        """``{layer: [P, d]}`` error nodes: clean MLP output minus the transcoder's."""
        for layer in range(self.n_layers):
            out = self.clean.mlp_out[layer][0]
            self.errors[layer] = out - recon[layer] if layer in recon else out.clone()
        # Active features: (layer, pos, id) and activation, sorted by layer, pos, id.
        rows = []
        for layer in replacement.layers:
            pos, fid = self.acts[layer].nonzero(as_tuple=True)
            vals = self.acts[layer][pos, fid]
            rows.append((torch.full_like(pos, layer), pos, fid, vals))
        if rows:  # kept on the CPU: they index and label, the device only multiplies
            self.active = torch.stack([torch.cat([r[i] for r in rows]) for i in range(3)], 1).cpu()
            self.active_acts = torch.cat([r[3] for r in rows]).cpu()
        else:
            self.active = torch.zeros(0, 3, dtype=torch.long)
            self.active_acts = torch.zeros(0, dtype=dtype)

    # ----- writes ---------------------------------------------------------------------------

    def _skip(self, layer: int, x: Tensor) -> Tensor | None:
        if layer not in self.rep.layers:
            return None
        W_skip = self.rep.skip(layer)
        if W_skip is None:
            return None
        return (x @ W_skip.T.to(x.dtype)) * self.covered_P[:, None].to(x.dtype)

    def _recon(self, acts: dict[int, Tensor]) -> dict[int, Tensor]:
        """``{layer: [P, d]}`` the transcoders' MLP outputs, skip term on the clean inputs."""
        out = {}
        mask = self.covered_P[:, None]
        for dst in self.rep.layers:
            y = self._add_feature_writes(self.rep.b_dec(dst).to(acts[dst].dtype) * mask, dst, acts)
            skip = self._skip(dst, self.clean.mlp_in[dst][0])
            out[dst] = y if skip is None else y + skip
        return out

    def constant_writes(self) -> dict[int, Tensor]:
        """``{layer: [P, d]}`` the part of each write that is no node: ``b_dec`` at covered
        positions of covered layers, zero elsewhere."""
        zero = torch.zeros_like(self.clean.mlp_out[0][0])
        mask = self.covered_P[:, None]
        return {
            layer: (
                self.rep.b_dec(layer).to(zero.dtype) * mask if layer in self.rep.layers else zero
            )
            for layer in range(self.n_layers)
        }

    def writes(
        self, acts: dict[int, Tensor] | None = None, errors: dict[int, Tensor] | None = None
    ) -> dict[int, Tensor]:
        """``{layer: [P, d]}`` the constant MLP writes of the frozen model from node values
        (default: the clean ones): ``b_dec + Σ feature writes + error`` (skip term excluded)."""
        acts = self.acts if acts is None else acts
        errors = self.errors if errors is None else errors
        out = self.constant_writes()
        for dst in range(self.n_layers):
            y = out[dst] + errors[dst]
            out[dst] = self._add_feature_writes(y, dst, acts) if dst in self.rep.layers else y
        return out

    def _add_feature_writes(self, y: Tensor, dst: int, acts: dict[int, Tensor]) -> Tensor:
        """``y`` plus every covered layer's feature writes into ``dst`` (``acts`` ``{layer:
        [P, F]}``), added from the lowest source layer up."""
        for src in self.rep.layers:
            if src > dst:
                break
            W = self.rep.decoder(src, dst)
            if W is not None:
                y = y + acts[src] @ W.to(y.dtype)
        return y

    # ----- targets --------------------------------------------------------------------------

    def clean_value(self, target: Target) -> float:
        """The target's value in the clean run."""
        if target.kind == "logit":
            logits = self.clean.logits[0, target.pos]
            return float(logits[target.index] - logits.mean())
        W_enc, b_enc = self.rep.encoder(target.layer)
        x = self.clean.mlp_in[target.layer][0, target.pos]
        return float(x.to(W_enc.dtype) @ W_enc[:, target.index] + b_enc[target.index])

    def forward(
        self,
        targets: list[Target],
        embeds: Tensor,
        writes: dict[int, Tensor],
    ) -> Tensor:
        """``[B]`` the targets' values in the frozen model with input embeddings ``embeds``
        ``[B, P, d]`` and MLP writes ``{layer: [B, P, d]}`` (target ``b`` from batch row ``b``)."""
        kinds = {t.kind for t in targets}
        if len(kinds) != 1:
            raise SaelabError("a batch of graph targets must be all features or all logits")
        logits = kinds == {"logit"}
        stop = None if logits else max(t.layer for t in targets)
        inputs: dict[int, Tensor] = {}

        def mlp_fn(layer: int, x: Tensor) -> Tensor:
            inputs[layer] = x
            out = writes[layer]
            skip = self._skip(layer, x)
            if skip is not None:
                out = out + skip
            if layer == stop:
                raise _Stop
            return out

        rows = torch.arange(len(targets), device=embeds.device)
        with frozen_model(self.model, self.clean, mlp_fn):
            try:
                out = self.model(
                    inputs_embeds=embeds, use_cache=False, logits_to_keep=1 if logits else 0
                )
            except _Stop:
                out = None
        if logits:
            last = out.logits[:, -1]
            ids = torch.tensor([t.index for t in targets], device=last.device)
            return last[rows, ids] - last.mean(-1)
        values = []
        for b, t in enumerate(targets):
            W_enc, b_enc = self.rep.encoder(t.layer)
            x = inputs[t.layer][b, t.pos]
            values.append(x @ W_enc[:, t.index].to(x.dtype) + b_enc[t.index].to(x.dtype))
        return torch.stack(values)

    def batch_inputs(self, batch: int) -> tuple[Tensor, dict[int, Tensor]]:
        """Clean embeddings ``[B, P, d]`` and writes ``{layer: [B, P, d]}``, fresh leaves."""
        embeds = self.clean.embeds.expand(batch, -1, -1).clone()
        writes = {layer: w.expand(batch, -1, -1).clone() for layer, w in self.writes().items()}
        return embeds, writes

    def biases(self, targets: list[Target]) -> Tensor:
        """``[B]`` each target's constant term: its value with every source node at zero."""
        batch = len(targets)
        embeds = torch.zeros_like(self.clean.embeds).expand(batch, -1, -1)
        writes = {layer: w.expand(batch, -1, -1) for layer, w in self.constant_writes().items()}
        with torch.no_grad():
            return self.forward(targets, embeds, writes)

    @property
    def n_columns(self) -> int:
        """Source columns of a row: active features, errors (layer-major), tokens."""
        return len(self.active) + self.n_layers * self.n_pos + self.n_pos

    def rows(self, targets: list[Target]) -> Tensor:
        """``[B, n_columns]`` direct effects on each target from every source node."""
        embeds, writes = self.batch_inputs(len(targets))
        leaves = [embeds.requires_grad_(), *(w.requires_grad_() for w in writes.values())]
        with torch.enable_grad():
            values = self.forward(targets, embeds, writes)
            grads = torch.autograd.grad(values.sum(), leaves, allow_unused=True)
        g_writes = dict(zip(writes, grads[1:], strict=True))  # None: no path to the targets
        return self.edges(grads[0], g_writes)

    def edges(self, g_embeds: Tensor, g_writes: dict[int, Tensor | None]) -> Tensor:
        """Direct effects ``[B, n_columns]`` from the gradients at every write location."""
        B, dtype = g_embeds.shape[0], g_embeds.dtype
        parts = []
        for layer in self.rep.layers:  # features, in the order of self.active
            sel = self.active[:, 0] == layer
            pos, fid = self.active[sel, 1], self.active[sel, 2]
            total = torch.zeros(B, len(pos), dtype=dtype, device=g_embeds.device)
            for dst in self.rep.layers:
                W = self.rep.decoder(layer, dst) if dst >= layer else None
                if W is None or g_writes.get(dst) is None:
                    continue
                total += torch.einsum("bnd,nd->bn", g_writes[dst][:, pos], W[fid].to(dtype))
            parts.append(total * self.active_acts[sel].to(g_embeds.device, dtype))
        errors = torch.zeros(B, self.n_layers, self.n_pos, dtype=dtype, device=g_embeds.device)
        for layer in range(self.n_layers):
            if g_writes.get(layer) is not None:
                errors[:, layer] = torch.einsum(
                    "bpd,pd->bp", g_writes[layer], self.errors[layer].to(dtype)
                )
        parts.append(errors.reshape(B, -1))
        parts.append(torch.einsum("bpd,pd->bp", g_embeds, self.clean.embeds[0].to(dtype)))
        return torch.cat(parts, dim=1)


# ----- the graph ------------------------------------------------------------------------------


def target_logits(
    clean_logits: Tensor, tokens: int | list[int], desired_prob: float = 0.95
) -> tuple[list[int], Tensor]:
    """Token ids and probabilities of the logit targets at the last position: the given ids, or
    the most likely tokens, at most ``tokens`` of them and no more than cover ``desired_prob``."""
    probs = clean_logits[0, -1].double().softmax(-1)
    if isinstance(tokens, list):
        return tokens, probs[tokens]
    top, ids = probs.topk(min(tokens, probs.shape[0]))
    reach = int((top.cumsum(0) < desired_prob).sum()) + 1
    keep = min(reach, len(ids))
    return ids[:keep].tolist(), top[:keep]


def _influence_rows(rows: Tensor, row_cols: Tensor, weights: Tensor, depth: int) -> Tensor:
    """Influence on the logits of every column from partially computed rows ``[R, C]``:
    ``w (Â + Â² + …)`` with ``Â`` the row-normalised ``|rows|`` and ``row_cols[r]`` the column
    of the node row ``r`` measures (-1 for logits)."""
    A = rows.abs()
    A = A / A.sum(1, keepdim=True).clamp_min(1e-30)
    x = weights.to(A.dtype)
    total = torch.zeros(A.shape[1], dtype=A.dtype)
    has_col = row_cols >= 0
    for _ in range(depth):
        y = x @ A
        total += y
        x = torch.zeros_like(x)
        x[has_col] = y[row_cols[has_col]]
        if not bool(x.any()):
            break
    return total


def _sorted_nodes(features: Tensor) -> Tensor:
    """The order that sorts ``[n, 3]`` (layer, pos, id) rows."""
    if len(features) == 0:
        return torch.zeros(0, dtype=torch.long)
    keys = [tuple(row) for row in features.tolist()]
    return torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)


def _fold(rows: Tensor, sel: Tensor, local: LocalReplacement) -> Tensor:
    """Rows over all source columns → columns (selected features ``sel``, errors, tokens), each
    left-out feature added to the error column of its layer and position."""
    n_active, n_pos = len(local.active), local.n_pos
    keep = torch.zeros(n_active, dtype=torch.bool)
    keep[sel] = True
    left = (~keep).nonzero().flatten()
    rest = rows[:, n_active:].clone()  # errors (layer-major), then tokens
    where = local.active[left, 0] * n_pos + local.active[left, 1]
    rest[:, : local.n_layers * n_pos].index_add_(1, where, rows[:, left])
    return torch.cat([rows[:, sel], rest], dim=1)


def build_graph(
    model: PreTrainedModel,
    tokenizer: Any,
    replacement: Replacement,
    prompt: str,
    *,
    target_tokens: int | list[int] = 10,
    desired_prob: float = 0.95,
    max_features: int = 1000,
    batch_size: int = 32,
    max_adjacency_mb: float = 2048,
    biases: bool = False,
    input_ids: Tensor | None = None,
    progress: bool = False,
) -> Graph:
    """The attribution graph of ``prompt`` (BOS-prefixed) through ``replacement``.

    ``target_tokens``: how many top logits (up to those covering ``desired_prob``) or which
    token ids; ``max_features``: at most this many feature nodes (the rest fold into error
    nodes); ``batch_size``: targets per backward pass; ``biases``: also each row's constant term
    (one more forward pass per batch, for checks).
    """
    if input_ids is None:
        from saelab.analysis.graphs.prompts import prompt_input_ids

        input_ids = prompt_input_ids(model, tokenizer, prompt)
    local = LocalReplacement(model, replacement, input_ids)
    n_active, n_pos, n_layers = len(local.active), local.n_pos, local.n_layers
    tokens, probs = target_logits(local.clean.logits, target_tokens, desired_prob)
    probs = probs.cpu()
    n_sel = min(max_features, n_active)
    cols = local.n_columns
    mb = (n_sel + len(tokens)) * cols * 4 / 2**20
    dense = mb <= max_adjacency_mb
    if not dense:  # chunked: features picked up front, each batch folded as it comes
        small = (n_sel + len(tokens)) * (n_sel + cols - n_active) * 4 / 2**20
        if small > max_adjacency_mb:
            raise SaelabError(
                f"even folded, the graph's rows would take {small:,.0f} MB, over "
                f"--max-adjacency-mb {max_adjacency_mb:g}; lower --max-features or shorten "
                "the prompt"
            )
    dtype = local.clean.embeds.dtype
    logit_targets = [Target("logit", n_layers, n_pos - 1, t) for t in tokens]
    bar = tqdm(total=len(tokens) + n_sel, desc="graph rows", unit="row", disable=not progress)

    def compute(targets: list[Target]) -> tuple[Tensor, Tensor | None]:
        out, bias = [], []
        for start in range(0, len(targets), batch_size):
            chunk = targets[start : start + batch_size]
            rows = local.rows(chunk).cpu()
            out.append(rows if dtype == torch.float64 else rows.float())
            if biases:
                bias.append(local.biases(chunk).cpu())
            bar.update(len(chunk))
        return torch.cat(out), (torch.cat(bias) if biases else None)

    logit_rows, logit_bias = compute(logit_targets)
    feature_rows = torch.zeros(n_sel if dense else 0, cols, dtype=logit_rows.dtype)
    feature_bias = torch.zeros(n_sel, dtype=dtype)
    chosen: list[int] = []  # indices into local.active, in the order computed
    weights = torch.cat([probs.to(logit_rows.dtype), torch.zeros(n_sel, dtype=logit_rows.dtype)])

    def feature_target(i: int) -> Target:
        layer, pos, fid = (int(v) for v in local.active[i])
        return Target("feature", layer, pos, fid)

    if not dense:
        # Candidates by their direct influence on the logits; rows folded batch by batch.
        no_cols = torch.full((len(tokens),), -1)
        direct = _influence_rows(logit_rows, no_cols, probs.to(logit_rows.dtype), 1)
        sel = direct[:n_active].topk(n_sel).indices
        sel = sel[_sorted_nodes(local.active[sel])]
        folded = [_fold(logit_rows, sel, local)]
        targets = [feature_target(int(i)) for i in sel]
        feature_bias_parts = []
        for start in range(0, n_sel, batch_size):
            rows, bias = compute(targets[start : start + batch_size])
            folded.insert(-1, _fold(rows, sel, local))
            if bias is not None:
                feature_bias_parts.append(bias)
        if feature_bias_parts:
            feature_bias = torch.cat(feature_bias_parts)
        chosen = sel.tolist()
    elif n_sel == n_active:  # every active feature: no selection needed
        order = sorted(range(n_active), key=lambda i: -int(local.active[i, 0]))
        for start in range(0, n_active, batch_size):
            batch = order[start : start + batch_size]
            rows, bias = compute([feature_target(i) for i in batch])
            feature_rows[len(chosen) : len(chosen) + len(batch)] = rows
            if bias is not None:
                feature_bias[len(chosen) : len(chosen) + len(batch)] = bias
            chosen += batch
    else:  # greedy: the most influential features not yet computed, a batch at a time
        picked = torch.zeros(n_active, dtype=torch.bool)
        while len(chosen) < n_sel:
            R = len(tokens) + len(chosen)
            row_cols = torch.tensor([-1] * len(tokens) + chosen, dtype=torch.long)
            all_rows = torch.cat([logit_rows, feature_rows[: len(chosen)]])
            influence = _influence_rows(all_rows, row_cols, weights[:R], n_layers + 2)
            score = influence[:n_active].clone()
            score[picked] = -1
            take = min(batch_size, n_sel - len(chosen))
            batch = score.topk(take).indices.tolist()
            rows, bias = compute([feature_target(i) for i in batch])
            feature_rows[len(chosen) : len(chosen) + take] = rows
            if bias is not None:
                feature_bias[len(chosen) : len(chosen) + take] = bias
            picked[batch] = True
            chosen += batch
    bar.close()

    # Nodes in (layer, pos, id) order; left-out features folded into their error node.
    if dense:
        order = _sorted_nodes(local.active[torch.tensor(chosen, dtype=torch.long)])
        sel = torch.tensor(chosen, dtype=torch.long)[order]
        source_rows = torch.cat([feature_rows[order], logit_rows])
        block = _fold(source_rows, sel, local)  # [n_f + n_l, N - n_l]
    else:
        order = torch.arange(n_sel)
        block = torch.cat(folded)
    n_f = len(sel)
    N = n_f + n_layers * n_pos + n_pos + len(tokens)
    adjacency = torch.zeros(N, N, dtype=logit_rows.dtype)
    adjacency[:n_f, : N - len(tokens)] = block[:n_f]
    adjacency[N - len(tokens) :, : N - len(tokens)] = block[n_f:]

    values = torch.zeros(N, dtype=torch.float64)
    for j, i in enumerate(sel.tolist()):
        values[j] = local.clean_value(feature_target(i))
    for j, t in enumerate(logit_targets):
        values[N - len(tokens) + j] = local.clean_value(t)
    bias_all = None
    if biases:
        bias_all = torch.zeros(N, dtype=torch.float64)
        bias_all[:n_f] = feature_bias[order].double()
        bias_all[N - len(tokens) :] = logit_bias.double()
    last = local.clean.logits[0, -1]
    return Graph(
        prompt=prompt,
        input_ids=input_ids[0].tolist(),
        n_layers=n_layers,
        layers=list(replacement.layers),
        features=local.active[sel].cpu(),
        activations=local.active_acts[sel].double().cpu(),
        error_norms=torch.stack([local.errors[i].norm(dim=-1) for i in range(n_layers)])
        .double()
        .cpu(),
        logit_tokens=tokens,
        logit_probs=probs.double().cpu(),
        logit_values=(last[tokens] - last.mean()).double().cpu(),
        adjacency=adjacency,
        values=values,
        biases=bias_all,
        n_active=n_active,
        kind=replacement.kind,
        errors={layer: local.errors[layer] for layer in replacement.layers},
    )
