"""The model at one prompt with attention patterns and norm scales frozen (Ameisen et al. 2025).

:func:`record_clean` runs the model once and keeps what the frozen model needs: every
attention pattern (post-softmax weights ``[1, H, P, P]``), every norm's scale (``1/RMS`` or
``1/std`` per position), the MLP inputs and outputs of every layer, the input embeddings and the
logits. Inside :func:`frozen_model` the same model then computes

- attention as ``pattern · V`` with the recorded pattern (queries and keys no longer matter),
- every norm as ``x · scale · gain (+ bias)`` (LayerNorm: ``(x − mean x) · scale · gain + bias``)
  with the recorded scale,
- every MLP as whatever ``mlp_fn(layer, x_in)`` returns (the graph builder: a constant write
  plus a skip transcoder's linear term),

so the model is affine in its input embeddings and MLP writes: the "local replacement model"
of the paper once the MLP outputs are transcoder writes plus error terms. Both modes work by
selecting a registered attention function (``AttentionInterface``; the clean run uses the
family's own eager attention, so it records the weights it applies) and wrapping the norm
modules' ``forward``; everything is restored on exit. Families: GPT-2, GPT-NeoX, Llama (and
Mistral, Qwen2), Gemma.

Example:
    >>> clean = record_clean(model, input_ids)
    >>> with frozen_model(model, clean, lambda layer, x: clean.mlp_out[layer]):
    ...     logits = model(inputs_embeds=clean.embeds, use_cache=False).logits  # = clean.logits
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from saelab.errors import SaelabError
from saelab.models.hookpoints import model_family, n_layers, resolve_hook

ATTENTION_NAME = "saelab_frozen"
"""The attention implementation registered with transformers while a graph is built."""
FAMILIES = ("gpt2", "gpt_neox", "llama", "gemma")
"""Families (``saelab.models.hookpoints.FAMILIES`` names) whose frozen model is verified."""

MlpFn = Callable[[int, Tensor], Tensor]


@dataclass
class _Norm:
    """A norm's frozen pieces: ``scale [.., P, 1]``, the gain, the bias, whether it centres."""

    scale: Tensor
    gain: Tensor
    bias: Tensor | None
    centred: bool

    def apply(self, x: Tensor) -> Tensor:
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        y = x * self.scale.to(x.dtype) * self.gain.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


@dataclass
class CleanRun:
    """What one clean forward pass at the prompt leaves for the frozen model."""

    input_ids: Tensor
    """``[1, P]`` the prompt's tokens."""
    embeds: Tensor
    """``[1, P, d]`` the token embeddings (the model's input embedding module's output)."""
    mlp_in: dict[int, Tensor]
    """``{layer: [1, P, d]}`` every MLP's input (``blocks.L.ln2.hook_normalized``)."""
    mlp_out: dict[int, Tensor]
    """``{layer: [1, P, d]}`` every MLP's output (``blocks.L.hook_mlp_out``)."""
    logits: Tensor
    """``[1, P, V]``."""
    patterns: dict[nn.Module, Tensor] = field(default_factory=dict)
    norms: dict[nn.Module, _Norm] = field(default_factory=dict)


class _State:
    """What the patched attention and norms do right now: record, or apply the frozen values."""

    def __init__(self, clean: CleanRun | None, mlp_fn: MlpFn | None) -> None:
        self.clean = clean
        self.recording = clean is None
        self.patterns: dict[nn.Module, Tensor] = {}
        self.norms: dict[nn.Module, _Norm] = {}
        self.mlp_in: dict[int, Tensor] = {}
        self.mlp_out: dict[int, Tensor] = {}
        self.mlp_fn = mlp_fn


_ACTIVE: list[_State] = []


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention that records its weights (clean run) or applies recorded ones (frozen)."""
    state = _ACTIVE[-1]
    if state.recording:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise SaelabError(
                f"{type(module).__name__} has no eager attention to record patterns from; "
                f"attribution graphs support the {', '.join(FAMILIES)} families"
            )
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        state.patterns[module] = weights.detach()
        return out, weights
    weights = state.clean.patterns[module]
    groups = query.shape[1] // value.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        value = value.repeat_interleave(groups, dim=1)
    out = weights.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION_NAME, _frozen_attention)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")
    ]


def _record_norm(module: nn.Module, x: Tensor, y: Tensor) -> _Norm:
    """The frozen form of a norm from one call; refuses a norm it cannot reproduce."""
    centred = isinstance(module, nn.LayerNorm)
    xd = x.detach()
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    if centred:
        scale = torch.rsqrt(xd.var(-1, unbiased=False, keepdim=True) + eps)
    else:
        scale = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    weight = getattr(module, "weight", None)
    ones = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    gains = [ones] if weight is None else [weight.detach(), 1 + weight.detach()]  # Gemma: 1 + w
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach()
    tol = 1e-4 * float(y.detach().abs().max()) + 1e-6
    for gain in gains:
        norm = _Norm(scale, gain, bias, centred)
        if float((norm.apply(xd) - y.detach()).abs().max()) <= tol:
            return norm
    raise SaelabError(
        f"cannot freeze the norm {type(module).__name__}: it is neither a LayerNorm nor an "
        f"RMSNorm; attribution graphs support the {', '.join(FAMILIES)} families"
    )


def _mlp_modules(model: PreTrainedModel) -> dict[int, nn.Module]:
    out = {}
    for layer in range(n_layers(model)):
        point = resolve_hook(model, f"blocks.{layer}.hook_mlp_out")
        out[layer] = model.get_submodule(point.module_path)
    return out


def check_family(model: PreTrainedModel) -> None:
    """One-line error for a model whose frozen form saelab has not verified."""
    family = model_family(model)
    if family is None or family.name not in FAMILIES:
        name = family.name if family else getattr(model.config, "model_type", type(model).__name__)
        raise SaelabError(
            f"attribution graphs support the {', '.join(FAMILIES)} families, not {name}; "
            "use a model of one of those"
        )


@contextmanager
def _instrumented(model: PreTrainedModel, state: _State) -> Iterator[None]:
    check_family(model)
    previous = model.config._attn_implementation
    with ExitStack() as stack:
        model.set_attn_implementation(ATTENTION_NAME)
        stack.callback(model.set_attn_implementation, previous)
        for module in _norm_modules(model):
            stack.enter_context(_replaced_forward(module, _norm_forward(module, state)))
        for layer, module in _mlp_modules(model).items():
            stack.enter_context(_replaced_forward(module, _mlp_forward(layer, module, state)))
        if not state.recording:  # frozen patterns: separate query and key projections are unused
            for projection in _query_key_projections(model):
                stack.enter_context(_replaced_forward(projection, _zeros_of(projection)))
        _ACTIVE.append(state)
        stack.callback(_ACTIVE.pop)
        yield


def _query_key_projections(model: nn.Module) -> list[nn.Linear]:
    """The ``q_proj`` / ``k_proj`` Linears of Llama-style attention (fused ones are left)."""
    out = []
    for module in model.modules():
        for name in ("q_proj", "k_proj"):
            projection = getattr(module, name, None)
            if isinstance(projection, nn.Linear):
                out.append(projection)
    return out


def _zeros_of(projection: nn.Linear) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        return x.new_zeros(*x.shape[:-1], projection.out_features)

    return forward


@contextmanager
def _replaced_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    had = "forward" in vars(module)
    before = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = before
        else:
            del module.forward


def _norm_forward(module: nn.Module, state: _State) -> Callable[[Tensor], Tensor]:
    original = type(module).forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if state.recording:
            y = original(module, x, *args, **kwargs)
            norm = state.norms[module] = _record_norm(module, x, y)
            # The frozen form at full precision (Llama and Gemma norms round through float32),
            # so that the clean run and the frozen model agree to the last bit.
            return norm.apply(x)
        return state.clean.norms[module].apply(x)

    return forward


def _mlp_forward(layer: int, module: nn.Module, state: _State) -> Callable[[Tensor], Tensor]:
    original = type(module).forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if state.recording:
            y = original(module, x, *args, **kwargs)
            state.mlp_in[layer], state.mlp_out[layer] = x.detach(), y.detach()
            return y
        return state.mlp_fn(layer, x)

    return forward


@torch.no_grad()
def record_clean(model: PreTrainedModel, input_ids: Tensor) -> CleanRun:
    """One clean forward pass at ``input_ids [1, P]`` with everything the frozen model needs."""
    state = _State(None, None)
    with _instrumented(model, state):
        embeds = model.get_input_embeddings()(input_ids)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
    clean = CleanRun(input_ids, embeds, state.mlp_in, state.mlp_out, logits)
    clean.patterns, clean.norms = state.patterns, state.norms
    return clean


@contextmanager
def frozen_model(model: PreTrainedModel, clean: CleanRun, mlp_fn: MlpFn) -> Iterator[None]:
    """Inside: ``model`` with the clean run's attention patterns and norm scales, and
    ``mlp_fn(layer, x_in) → [B, P, d]`` in place of every MLP. Batches of any size broadcast."""
    with _instrumented(model, _State(clean, mlp_fn)):
        yield
