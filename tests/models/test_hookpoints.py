"""Hook names resolve to the activations they promise, checked against the models' own maths."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers import OPTConfig, OPTForCausalLM, PreTrainedModel

from saelab.errors import SaelabError, UnknownHookError
from saelab.models import (
    HOOKS,
    capture,
    hook_at_layer,
    hook_dim,
    hook_layer,
    hook_layer_and_suffix,
    list_hooks,
    n_layers,
    resolve_hook,
    split_hook_name,
)
from tiny_models import N_LAYERS, VOCAB_SIZE, build_tiny_model, tiny_input_ids

pytestmark = pytest.mark.integration

Block = nn.Module

# Oracles written out by hand from each family's modeling code, independent of saelab's tables.
BLOCKS: dict[str, Callable[[PreTrainedModel], nn.ModuleList]] = {
    "gpt2": lambda m: m.transformer.h,
    "gpt_neox": lambda m: m.gpt_neox.layers,
    "llama": lambda m: m.model.layers,
    "gemma": lambda m: m.model.layers,
    "gemma2": lambda m: m.model.layers,
}
FINAL_NORM: dict[str, Callable[[PreTrainedModel], nn.Module]] = {
    "gpt2": lambda m: m.transformer.ln_f,
    "gpt_neox": lambda m: m.gpt_neox.final_layer_norm,
    "llama": lambda m: m.model.norm,
    "gemma": lambda m: m.model.norm,
    "gemma2": lambda m: m.model.norm,
}
# z -> what the attention sublayer adds to the residual stream.
ATTN_OUT_OF_Z: dict[str, Callable[[Block, Tensor], Tensor]] = {
    "gpt2": lambda b, z: b.attn.c_proj(z),
    "gpt_neox": lambda b, z: b.attention.dense(z),
    "llama": lambda b, z: b.self_attn.o_proj(z),
    "gemma": lambda b, z: b.self_attn.o_proj(z),
    "gemma2": lambda b, z: b.post_attention_layernorm(b.self_attn.o_proj(z)),
}
# MLP hidden activation -> what the MLP sublayer adds to the residual stream.
MLP_OUT_OF_POST: dict[str, Callable[[Block, Tensor], Tensor]] = {
    "gpt2": lambda b, h: b.mlp.c_proj(h),
    "gpt_neox": lambda b, h: b.mlp.dense_4h_to_h(h),
    "llama": lambda b, h: b.mlp.down_proj(h),
    "gemma": lambda b, h: b.mlp.down_proj(h),
    "gemma2": lambda b, h: b.post_feedforward_layernorm(b.mlp.down_proj(h)),
}
# MLP input -> what the MLP sublayer adds to the residual stream.
MLP_OUT_OF_INPUT: dict[str, Callable[[Block, Tensor], Tensor]] = {
    "gpt2": lambda b, x: b.mlp(x),
    "gpt_neox": lambda b, x: b.mlp(x),
    "llama": lambda b, x: b.mlp(x),
    "gemma": lambda b, x: b.mlp(x),
    "gemma2": lambda b, x: b.post_feedforward_layernorm(b.mlp(x)),
}
# (resid_pre, attn_out) -> the MLP's input: parallel residual (NeoX) reads the block input.
MLP_INPUT: dict[str, Callable[[Block, Tensor, Tensor], Tensor]] = {
    "gpt2": lambda b, pre, attn: b.ln_2(pre + attn),
    "gpt_neox": lambda b, pre, attn: b.post_attention_layernorm(pre),
    "llama": lambda b, pre, attn: b.post_attention_layernorm(pre + attn),
    "gemma": lambda b, pre, attn: b.post_attention_layernorm(pre + attn),
    "gemma2": lambda b, pre, attn: b.pre_feedforward_layernorm(pre + attn),
}


def all_activations(model: PreTrainedModel) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Every hook's activation and HF's own hidden states, from one forward pass."""
    with torch.no_grad(), capture(model, list_hooks(model), stop=False) as acts:
        out = model(tiny_input_ids(), output_hidden_states=True)
    return acts, out.hidden_states


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_list_hooks_covers_every_layer_in_forward_order(tiny_model: PreTrainedModel) -> None:
    names = list_hooks(tiny_model)
    assert len(names) == N_LAYERS * 7 == n_layers(tiny_model) * len(HOOKS)
    assert len(set(names)) == len(names)
    assert names[0] == "blocks.0.hook_resid_pre"
    assert names[-1] == f"blocks.{N_LAYERS - 1}.hook_resid_post"
    layers = [hook_layer(tiny_model, name) for name in names]
    assert layers == sorted(layers)


def test_resid_hooks_match_hf_hidden_states(tiny_model: PreTrainedModel) -> None:
    family = tiny_model.config.model_type
    acts, hidden = all_activations(tiny_model)
    for layer in range(N_LAYERS):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    for layer in range(N_LAYERS - 1):
        assert torch.equal(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])
    # HF's last hidden state has the final norm applied; the hook is the raw residual stream.
    last = acts[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    with torch.no_grad():
        assert close(FINAL_NORM[family](tiny_model)(last), hidden[-1])
    assert not close(last, hidden[-1])


def test_block_output_is_input_plus_sublayer_outputs(tiny_model: PreTrainedModel) -> None:
    # Holds for sequential and parallel residuals alike; for Gemma2 only if attn_out and
    # mlp_out are taken after the post-norms, i.e. what the residual stream really receives.
    acts, _ = all_activations(tiny_model)
    for layer in range(N_LAYERS):
        p = f"blocks.{layer}."
        total = acts[p + "hook_resid_pre"] + acts[p + "hook_attn_out"] + acts[p + "hook_mlp_out"]
        assert close(total, acts[p + "hook_resid_post"])
        if layer + 1 < N_LAYERS:
            assert torch.equal(
                acts[p + "hook_resid_post"], acts[f"blocks.{layer + 1}.hook_resid_pre"]
            )


def test_inner_hooks_map_through_the_sublayers(tiny_model: PreTrainedModel) -> None:
    family = tiny_model.config.model_type
    acts, _ = all_activations(tiny_model)
    with torch.no_grad():
        for layer, block in enumerate(BLOCKS[family](tiny_model)):
            a = {suffix: acts[f"blocks.{layer}.{suffix}"] for suffix in HOOKS}
            assert close(ATTN_OUT_OF_Z[family](block, a["attn.hook_z"]), a["hook_attn_out"])
            assert close(MLP_OUT_OF_POST[family](block, a["mlp.hook_post"]), a["hook_mlp_out"])
            mlp_in = MLP_INPUT[family](block, a["hook_resid_pre"], a["hook_attn_out"])
            assert close(mlp_in, a["ln2.hook_normalized"])
            assert close(MLP_OUT_OF_INPUT[family](block, mlp_in), a["hook_mlp_out"])


def test_hook_dim_is_the_activation_width(tiny_model: PreTrainedModel) -> None:
    acts, _ = all_activations(tiny_model)
    batch, pos = tiny_input_ids().shape
    for name, act in acts.items():
        assert act.shape == (batch, pos, hook_dim(tiny_model, name)), name


def test_gqa_head_width_differs_from_d_model() -> None:
    # Guards the tiny models themselves: hook_z must not be testable by accident with d_model.
    model = build_tiny_model("llama")
    assert hook_dim(model, "blocks.0.attn.hook_z") != hook_dim(model, "blocks.0.hook_resid_pre")


def test_unknown_hook_error_is_one_line_listing_the_valid_names() -> None:
    model = build_tiny_model("llama")
    for bad in ("blocks.99.hook_resid_post", "blocks.0.hook_nope", "hook_resid_post"):
        with pytest.raises(UnknownHookError) as info:
            resolve_hook(model, bad)
        message = str(info.value)
        assert "\n" not in message
        assert f"'{bad}'" in message
        assert f"blocks.{{0..{N_LAYERS - 1}}}." in message
        assert all(suffix in message for suffix in HOOKS)
        assert "module path" in message
        assert isinstance(info.value, SaelabError)
        assert isinstance(info.value, KeyError)  # callers may treat it as a missing key


def test_module_paths_are_an_escape_hatch(tiny_model: PreTrainedModel) -> None:
    blocks = BLOCKS[tiny_model.config.model_type](tiny_model)
    path = next(name for name, module in tiny_model.named_modules() if module is blocks[1])
    point = resolve_hook(tiny_model, path)
    assert (point.module_path, point.where, point.layer) == (path, "output", 1)
    # A block's output is its resid_post, so capturing the raw path gives the same tensor.
    name = "blocks.1.hook_resid_post"
    with torch.no_grad(), capture(tiny_model, [path, name]) as acts:
        tiny_model(tiny_input_ids())
    assert torch.equal(acts[path], acts[name])


def test_module_path_width_comes_from_its_parameters() -> None:
    model = build_tiny_model("llama")
    assert hook_dim(model, "model.layers.0.mlp.up_proj") == model.config.intermediate_size
    assert hook_dim(model, "model.norm") == model.config.hidden_size
    assert hook_layer(model, "model.norm") is None
    with pytest.raises(SaelabError, match="width"):
        hook_dim(model, "model.layers.0.mlp")


def test_bare_base_model_resolves_the_same_hooks() -> None:
    model = build_tiny_model("llama")
    point = resolve_hook(model.model, "blocks.2.hook_mlp_out")
    assert point.module_path == "layers.2.mlp"
    assert list_hooks(model.model) == list_hooks(model)


def test_unknown_family_works_only_with_module_paths() -> None:
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=32,
    )
    model = OPTForCausalLM(config).eval()
    assert list_hooks(model) == []
    with pytest.raises(UnknownHookError) as info:
        resolve_hook(model, "blocks.0.hook_resid_post")
    message = str(info.value)
    assert "\n" not in message and "opt" in message and "only module paths" in message
    point = resolve_hook(model, "model.decoder.layers.1.fc2")
    assert point.layer is None and point.where == "output"
    assert hook_dim(model, "model.decoder.layers.1.fc2") == 32
    with pytest.raises(SaelabError, match="no hook table"):
        n_layers(model)


def test_hook_names_split_into_layer_and_suffix_and_move_between_layers() -> None:
    for suffix in HOOKS:
        assert split_hook_name(f"blocks.12.{suffix}") == (12, suffix)
        assert hook_layer_and_suffix(f"blocks.3.{suffix}") == (3, suffix)
        assert hook_at_layer(f"blocks.6.{suffix}", 2) == f"blocks.2.{suffix}"
    for name in ("model.embed_tokens", "blocks.x.hook_resid_post", "blocks.1.hook_nothing", ""):
        assert split_hook_name(name) is None
        with pytest.raises(SaelabError, match="no layer index") as err:
            hook_at_layer(name, 0)
        assert "\n" not in str(err.value)
