"""capture / patch / run_to_hooks: what they record, change, and leave behind."""

import pytest
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from saelab.errors import SaelabError, UnknownHookError
from saelab.models import capture, list_hooks, patch, resolve_hook, run_to_hooks
from tiny_models import N_LAYERS, build_tiny_model, tiny_input_ids

pytestmark = pytest.mark.integration

LAST = N_LAYERS - 1


def hook_count(model: nn.Module) -> int:
    # Compared before/after rather than to 0: transformers installs its own permanent hooks the
    # first time output_hidden_states is asked for.
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def logits(model: PreTrainedModel, input_ids: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model(tiny_input_ids() if input_ids is None else input_ids).logits


class CallCounter:
    """A forward hook that counts the calls of one module."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *_: object) -> None:
        self.calls += 1


def test_capture_records_every_hook_with_its_shape(tiny_model: PreTrainedModel) -> None:
    names = list_hooks(tiny_model)
    input_ids = tiny_input_ids()
    with torch.no_grad(), capture(tiny_model, names) as acts:
        tiny_model(input_ids)
    assert list(acts) == names  # filled in forward order
    assert all(act.shape[:2] == input_ids.shape for act in acts.values())
    assert run_to_hooks(tiny_model, input_ids, names[3:5]).keys() == set(names[3:5])
    for name, act in run_to_hooks(tiny_model, input_ids, names).items():
        assert torch.equal(act, acts[name])


def test_stop_ends_the_forward_after_the_deepest_hook(tiny_model: PreTrainedModel) -> None:
    head = CallCounter(tiny_model.get_output_embeddings())
    last_block = CallCounter(
        tiny_model.get_submodule(resolve_hook(tiny_model, "blocks.2.hook_resid_post").module_path)
    )
    with capture(tiny_model, ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]) as acts:
        tiny_model(tiny_input_ids())
        pytest.fail("the forward pass should have been stopped")  # pragma: no cover
    assert set(acts) == {"blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"}
    assert head.calls == 0 and last_block.calls == 0

    with capture(tiny_model, ["blocks.0.hook_mlp_out"], stop=False) as acts:
        tiny_model(tiny_input_ids())
    assert head.calls == 1 and last_block.calls == 1


def test_stop_at_an_input_hook_skips_that_block(tiny_model: PreTrainedModel) -> None:
    name = f"blocks.{LAST}.hook_resid_pre"
    last_block = CallCounter(tiny_model.get_submodule(resolve_hook(tiny_model, name).module_path))
    acts = run_to_hooks(tiny_model, tiny_input_ids(), [name])
    assert last_block.calls == 0
    assert acts[name].shape[-1] == tiny_model.config.hidden_size


def test_hooks_are_removed_on_exit_and_on_error(tiny_model: PreTrainedModel) -> None:
    names = list_hooks(tiny_model)
    tiny_model(tiny_input_ids(), output_hidden_states=True)  # let transformers add its own
    before = hook_count(tiny_model)
    with capture(tiny_model, names, stop=False), patch(tiny_model, dict.fromkeys(names, abs)):
        assert hook_count(tiny_model) == before + 2 * len(names)
        tiny_model(tiny_input_ids())
    assert hook_count(tiny_model) == before
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_model, names):
        raise RuntimeError("boom")
    assert hook_count(tiny_model) == before

    def explode(act: Tensor) -> Tensor:
        raise RuntimeError("boom in the forward pass")

    raising = patch(tiny_model, {names[-1]: explode})
    with pytest.raises(RuntimeError, match="boom"), capture(tiny_model, names, stop=False), raising:
        tiny_model(tiny_input_ids())
    assert hook_count(tiny_model) == before
    # A bad name fails on entry, before anything is registered.
    with pytest.raises(UnknownHookError), capture(tiny_model, [names[0], "blocks.0.hook_nope"]):
        pass  # pragma: no cover
    assert hook_count(tiny_model) == before


def test_detach_false_keeps_the_autograd_graph() -> None:
    model = build_tiny_model("llama")
    name = "blocks.1.hook_resid_post"
    with capture(model, [name], detach=False) as acts:
        model(tiny_input_ids())
    acts[name].sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    with capture(model, [name]) as acts:
        model(tiny_input_ids())
    assert not acts[name].requires_grad


def test_identity_patch_leaves_logits_unchanged(tiny_model: PreTrainedModel) -> None:
    clean = logits(tiny_model)
    names = list_hooks(tiny_model)
    with patch(tiny_model, {name: lambda act: act.clone() for name in names}):
        assert torch.equal(logits(tiny_model), clean)


def test_zeroed_resid_changes_logits_and_later_layers_see_it(tiny_model: PreTrainedModel) -> None:
    clean = logits(tiny_model)
    clean_late = run_to_hooks(tiny_model, tiny_input_ids(), [f"blocks.{LAST}.hook_resid_post"])
    with patch(tiny_model, {"blocks.0.hook_resid_post": torch.zeros_like}):
        assert not torch.allclose(logits(tiny_model), clean)
        late = ["blocks.1.hook_resid_pre", f"blocks.{LAST}.hook_resid_post"]
        acts = run_to_hooks(tiny_model, tiny_input_ids(), late)
    assert torch.count_nonzero(acts["blocks.1.hook_resid_pre"]) == 0
    assert not torch.allclose(acts[late[1]], clean_late[late[1]])
    assert torch.equal(logits(tiny_model), clean)  # and all is undone on exit


def test_capture_sees_the_patched_value_in_either_nesting_order(
    tiny_model: PreTrainedModel,
) -> None:
    for name in ("blocks.1.hook_attn_out", "blocks.1.mlp.hook_post"):  # output and input side
        fns = {name: torch.zeros_like}
        with patch(tiny_model, fns), capture(tiny_model, [name]) as inner:
            tiny_model(tiny_input_ids())
        with capture(tiny_model, [name]) as outer, patch(tiny_model, fns):
            tiny_model(tiny_input_ids())
        assert torch.count_nonzero(inner[name]) == 0
        assert torch.count_nonzero(outer[name]) == 0


def test_input_side_patch_changes_what_the_module_computes(tiny_model: PreTrainedModel) -> None:
    # Not a constant shift: LayerNorm would cancel it and the block output would just shift too.
    delta = torch.linspace(-1.0, 1.0, tiny_model.config.hidden_size)
    pre, post = "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"
    clean = run_to_hooks(tiny_model, tiny_input_ids(), [pre, post])
    with patch(tiny_model, {pre: lambda act: act + delta}):
        shifted = run_to_hooks(tiny_model, tiny_input_ids(), [pre, post])
    assert torch.allclose(shifted[pre], clean[pre] + delta)
    assert not torch.allclose(shifted[post], clean[post] + delta, atol=1e-3)


def test_input_hook_also_works_when_the_input_is_a_keyword() -> None:
    model = build_tiny_model("gpt2")
    block = model.transformer.h[0]
    x = torch.randn(1, 4, model.config.n_embd)
    with torch.no_grad():
        expected = block(x + 1.0)
        with (
            capture(model, ["blocks.0.hook_resid_pre"], stop=False) as acts,
            patch(model, {"blocks.0.hook_resid_pre": lambda act: act + 1.0}),
        ):
            got = block(hidden_states=x)
    assert torch.equal(got, expected)
    assert torch.equal(acts["blocks.0.hook_resid_pre"], x + 1.0)


def test_patch_with_a_wrong_shape_names_both_shapes() -> None:
    model = build_tiny_model("llama")
    fns = {"blocks.0.hook_mlp_out": lambda act: act[..., :3]}
    with patch(model, fns), pytest.raises(SaelabError) as info:
        logits(model)
    message = str(info.value)
    assert "(2, 7, 3)" in message and "(2, 7, 64)" in message and "\n" not in message


def test_run_to_hooks_reports_hooks_that_never_fire() -> None:
    model = build_tiny_model("llama")
    model.unused = nn.Linear(2, 2)
    with pytest.raises(SaelabError, match="never fired"):
        run_to_hooks(model, tiny_input_ids(), ["unused"])


def test_run_to_hooks_takes_an_attention_mask() -> None:
    model = build_tiny_model("llama")
    input_ids = tiny_input_ids()
    name = f"blocks.{LAST}.hook_resid_post"
    full = run_to_hooks(model, input_ids, [name], attention_mask=torch.ones_like(input_ids))
    assert torch.equal(full[name], run_to_hooks(model, input_ids, [name])[name])
    # Masking the last positions cannot change earlier ones in a causal model.
    mask = torch.ones_like(input_ids)
    mask[:, -2:] = 0
    padded = run_to_hooks(model, input_ids, [name], attention_mask=mask)
    assert torch.allclose(padded[name][:, :-2], full[name][:, :-2], atol=1e-5)
