"""Transcoders: steps against dense references, the zero skip at init, scale folding, storage,
SAELens interop, training on a tiny Llama and splicing at the output hook (exact oracles)."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.config import RunConfig, SAEConfig, TrainConfig
from saelab.data.activations import ActivationStream
from saelab.data.text import TokenBatches
from saelab.errors import SaelabError
from saelab.evaluation.evaluate import evaluate_sae
from saelab.models.intervene import run_to_hooks
from saelab.saes import (
    ARCHITECTURES,
    ReLUTranscoder,
    SkipTranscoder,
    TopKSkipTranscoder,
    TopKTranscoder,
    Transcoder,
)
from saelab.saes.registry import check_run_saes, check_sae_config, sae_folder_name
from saelab.saes.storage import CFG_FILENAME, WEIGHTS_FILENAME, load_sae, save_sae
from saelab.training.trainer import Trainer
from tiny_models import build_tiny_model, build_tiny_tokenizer

D_IN, D_OUT, WIDTH, K = 12, 7, 40, 5
IN_HOOK, OUT_HOOK = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
TOL = {"rtol": 1e-5, "atol": 1e-5}
TOPK = (TopKTranscoder, TopKSkipTranscoder)
RELU = (ReLUTranscoder, SkipTranscoder)
ALL = RELU + TOPK


def make(cls: type[Transcoder], seed: int = 0, **fields) -> Transcoder:
    cfg = SAEConfig(
        architecture=cls.architecture,
        hook=IN_HOOK,
        output_hook=OUT_HOOK,
        width=WIDTH,
        k=K,
        **fields,
    )
    return cls(cfg, D_IN, d_out=D_OUT, seed=seed)


def randomise_(tc: Transcoder, seed: int = 1) -> Transcoder:
    """Random weights everywhere, W_skip included, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g))
    return tc


def data(n: int = 32, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, D_IN, generator=g) + 0.3, torch.randn(n, D_OUT, generator=g) - 0.2


def params(tc: Transcoder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_() for n, p in tc.named_parameters()}


def skip_term(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x @ p["W_skip"].T if "W_skip" in p else 0


# ----- the registry and the config ---------------------------------------------------------------


def test_transcoder_classes_are_exactly_the_architectures_that_need_an_output_hook():
    for name, cls in ARCHITECTURES.items():
        is_transcoder = issubclass(cls, Transcoder)
        assert cls.is_transcoder is is_transcoder, name
        check_sae_config(
            SAEConfig(architecture=name, output_hook=OUT_HOOK if is_transcoder else None)
        )
        with pytest.raises(SaelabError, match="output_hook"):
            check_sae_config(
                SAEConfig(architecture=name, output_hook=None if is_transcoder else OUT_HOOK)
            )
    assert {"transcoder", "skip_transcoder", "topk_transcoder", "topk_skip_transcoder"} <= set(
        ARCHITECTURES
    )


def test_config_requires_output_hook_for_transcoders_and_rejects_it_otherwise():
    # The architecture checks its settings when a run starts (and when an SAE is built).
    with pytest.raises(SaelabError) as err:
        check_run_saes([SAEConfig(architecture="topk_transcoder", hook=IN_HOOK)])
    assert "output_hook" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SaelabError) as err:
        check_run_saes([SAEConfig(architecture="topk", hook=IN_HOOK, output_hook=OUT_HOOK)])
    assert "output_hook" in str(err.value) and "transcoder" in str(err.value)
    with pytest.raises(SaelabError, match="output_hook"):
        TopKTranscoder(SAEConfig(architecture="topk_transcoder", hook=IN_HOOK), D_IN, d_out=D_OUT)
    for field, value in (("apply_b_dec_to_input", True), ("b_dec_init", "mean")):
        with pytest.raises(SaelabError, match=field):
            check_sae_config(
                SAEConfig(architecture="transcoder", output_hook=OUT_HOOK, **{field: value})
            )
    run = RunConfig(
        saes=(
            SAEConfig(architecture="transcoder", hook=IN_HOOK, output_hook=OUT_HOOK),
            SAEConfig(architecture="topk", hook=OUT_HOOK),
            SAEConfig(architecture="topk", hook="blocks.0.hook_resid_post"),
        )
    )
    assert run.hooks == [IN_HOOK, OUT_HOOK, "blocks.0.hook_resid_post"]


# ----- training steps against dense references ---------------------------------------------------


def topk_reference(p, x, y, k, dead_F=None, k_aux=0, aux_coefficient=0.0):
    """TopK by a full sort, dense matrices everywhere, AuxK on the residual y − ŷ."""
    pre = x @ p["W_enc"] + p["b_enc"]
    order = pre.sort(dim=-1, descending=True).indices[:, :k]
    z = torch.zeros_like(pre).scatter(-1, order, pre.gather(-1, order).relu())
    recon = z @ p["W_dec"] + p["b_dec"] + skip_term(p, x)
    mse = (y - recon).pow(2).sum(-1).mean()
    if dead_F is None:
        return mse, recon
    dead_pre = pre.masked_fill(~dead_F, float("-inf"))
    aux_order = dead_pre.sort(dim=-1, descending=True).indices[:, :k_aux]
    z_aux = torch.zeros_like(pre).scatter(-1, aux_order, pre.gather(-1, aux_order).relu())
    residual = (y - recon).detach()
    aux = (z_aux @ p["W_dec"] - residual).pow(2).sum(-1).mean()
    aux = aux / (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return mse + aux_coefficient * aux, recon


@pytest.mark.parametrize("cls", TOPK)
@pytest.mark.parametrize("with_aux", [False, True], ids=["no-aux", "auxk"])
def test_topk_transcoder_step_matches_a_dense_reference(cls, with_aux):
    tc = randomise_(make(cls, k_aux=3, aux_coefficient=0.25))
    x, y = data()
    dead_F = torch.zeros(WIDTH, dtype=torch.bool)
    dead_F[::4] = True  # 10 dead features, 3 of them used per token
    ref = params(tc)
    expected, expected_recon = topk_reference(
        ref, x, y, K, dead_F if with_aux else None, k_aux=3, aux_coefficient=0.25
    )
    expected.backward()
    out = tc.training_step(x, target_BD=y, dead_F=dead_F if with_aux else None)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, **TOL)
    torch.testing.assert_close(out.recon_BD, expected_recon, **TOL)
    assert ("auxk" in out.losses) is with_aux
    assert (out.feats.l0_per_token() <= K).all()
    for name, p in tc.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=name)


@pytest.mark.parametrize("cls", RELU)
def test_relu_transcoder_step_matches_a_dense_reference(cls):
    tc = randomise_(make(cls, l1_coefficient=0.3))
    x, y = data()
    ref = params(tc)
    z = (x @ ref["W_enc"] + ref["b_enc"]).relu()
    recon = z @ ref["W_dec"] + ref["b_dec"] + skip_term(ref, x)
    l1 = (z * ref["W_dec"].norm(dim=-1)).sum(-1).mean()
    expected = (y - recon).pow(2).sum(-1).mean() + 0.3 * 0.5 * l1
    expected.backward()
    out = tc.training_step(x, target_BD=y, penalty_scale=0.5)
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected, **TOL)
    torch.testing.assert_close(out.losses["l1"], l1.detach(), **TOL)
    torch.testing.assert_close(out.recon_BD, recon, **TOL)
    assert 0 < out.feats.l0_per_token().float().mean() < WIDTH
    for name, p in tc.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL, msg=name)


@pytest.mark.parametrize(("plain", "skip"), [RELU, TOPK], ids=["relu", "topk"])
def test_skip_transcoder_at_init_is_the_plain_transcoder(plain, skip):
    a, b = make(plain, seed=3), make(skip, seed=3)
    assert torch.equal(b.W_skip, torch.zeros(D_OUT, D_IN))
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name
    x, y = data()
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    out_a, out_b = a.training_step(x, target_BD=y), b.training_step(x, target_BD=y)
    torch.testing.assert_close(out_b.loss, out_a.loss, rtol=0, atol=0)
    out_b.loss.backward()
    assert b.W_skip.grad.abs().sum() > 0  # the skip path learns from the first step


def test_init_has_no_tied_weights_and_no_input_bias():
    tc = make(TopKTranscoder)
    assert tc.W_enc.shape == (D_IN, WIDTH) and tc.W_dec.shape == (WIDTH, D_OUT)
    assert tc.b_dec.shape == (D_OUT,) and not tc.apply_b_dec_to_input
    torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(WIDTH))
    relu = make(ReLUTranscoder)
    torch.testing.assert_close(relu.W_dec.norm(dim=-1), torch.full((WIDTH,), 0.1))
    torch.testing.assert_close(relu.W_enc.norm(dim=0), torch.full((WIDTH,), 0.1))
    with pytest.raises(SaelabError, match="apply_b_dec_to_input"):
        TopKTranscoder(tc.cfg, D_IN, d_out=D_OUT, apply_b_dec_to_input=True)


def test_relu_transcoder_can_keep_unit_norm_decoder_rows():
    tc = randomise_(make(ReLUTranscoder, decoder_unit_norm=True))
    x, y = data()
    tc.training_step(x, target_BD=y).loss.backward()
    tc.before_optimizer_step_()
    parallel = (tc.W_dec.grad * tc.W_dec).sum(-1) / tc.W_dec.norm(dim=-1)
    torch.testing.assert_close(parallel, torch.zeros(WIDTH), atol=1e-5, rtol=0)
    with torch.no_grad():
        tc.W_dec.sub_(0.1 * tc.W_dec.grad)
    tc.after_optimizer_step_()
    torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(WIDTH))
    assert not make(ReLUTranscoder).decoder_unit_norm


def test_training_step_needs_a_target_of_the_output_width():
    tc = make(TopKTranscoder)
    x, y = data()
    with pytest.raises(SaelabError, match="target_BD"):
        tc.training_step(x)
    with pytest.raises(SaelabError, match=f"d_out={D_OUT}"):
        tc.training_step(x, target_BD=x)


# ----- units, storage, SAELens -------------------------------------------------------------------


def scaled(cls: type[Transcoder]) -> Transcoder:
    tc = randomise_(make(cls))
    tc.activation_scale.fill_(0.37)
    tc.output_scale.fill_(2.9)
    return tc


def normalised_prediction(tc: Transcoder, x: torch.Tensor) -> torch.Tensor:
    """ŷ from the training-unit definition: scale x, predict, unscale by the output scale."""
    x_n = x * tc.activation_scale
    return tc.predict_normalised(x_n, tc.encode_normalised(x_n)) / tc.output_scale


@pytest.mark.parametrize("cls", ALL)
def test_save_load_roundtrip_folds_both_scales(cls, tmp_path):
    tc = scaled(cls)
    x, _ = data()
    with torch.no_grad():
        expected = normalised_prediction(tc, x)
        torch.testing.assert_close(tc(x), expected, **TOL)
        save_sae(tc, tmp_path)
        back = load_sae(tmp_path)
        assert type(back) is cls and back.cfg == tc.cfg
        assert (back.d_in, back.d_out, back.d_sae) == (D_IN, D_OUT, WIDTH)
        assert float(back.activation_scale) == 1 and float(back.output_scale) == 1
        torch.testing.assert_close(back(x), expected, **TOL)
        torch.testing.assert_close(back.encode(x), tc.encode(x), **TOL)
        save_sae(back, tmp_path / "again")  # folded weights at scale 1 are saved as they are
    first = load_sae(tmp_path).folded_state_dict()
    second = load_sae(tmp_path / "again").folded_state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_saved_files_follow_saelens_transcoder_layout(tmp_path):
    tc = scaled(TopKSkipTranscoder)
    save_sae(tc, tmp_path)
    cfg = json.loads((tmp_path / CFG_FILENAME).read_text())
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"]) == (D_IN, D_OUT, WIDTH)
    assert cfg["metadata"]["hook_name"] == IN_HOOK
    assert cfg["metadata"]["hook_name_out"] == OUT_HOOK
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["saelab"]["output_scale_folded"] == pytest.approx(2.9)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    assert {n: tuple(t.shape) for n, t in weights.items()} == {
        "W_enc": (D_IN, WIDTH),
        "b_enc": (WIDTH,),
        "W_dec": (WIDTH, D_OUT),
        "b_dec": (D_OUT,),
        "W_skip": (D_OUT, D_IN),
    }
    torch.testing.assert_close(weights["W_skip"], tc.W_skip.detach() * 0.37 / 2.9)


def test_a_weights_file_without_w_skip_is_a_one_line_error(tmp_path):
    save_sae(scaled(SkipTranscoder), tmp_path)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / WEIGHTS_FILENAME)
    del weights["W_skip"]
    save_file(weights, tmp_path / WEIGHTS_FILENAME)
    with pytest.raises(SaelabError, match="W_skip"):
        load_sae(tmp_path)


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("cls", RELU)
def test_saelab_transcoder_loads_in_saelens_with_identical_outputs(sae_lens, cls, tmp_path):
    ours = scaled(cls)
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert (
        type(theirs).__name__
        == {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder"}[cls.architecture]
    )
    assert theirs.cfg.d_out == D_OUT and theirs.cfg.metadata.hook_name_out == OUT_HOOK
    x, _ = data()
    with torch.no_grad():
        feats = ours.encode(x)
        assert (feats > 0).any() and (feats == 0).any()
        torch.testing.assert_close(theirs.encode(x), feats, **TOL)
        torch.testing.assert_close(theirs.decode(feats), ours.decode(feats), **TOL)
        torch.testing.assert_close(theirs(x), ours(x), **TOL)


@pytest.mark.parametrize("skip", [False, True], ids=["transcoder", "skip_transcoder"])
def test_saelens_transcoder_loads_in_saelab_with_identical_outputs(sae_lens, skip, tmp_path):
    config_cls = sae_lens.SkipTranscoderConfig if skip else sae_lens.TranscoderConfig
    cfg = config_cls(d_in=D_IN, d_sae=WIDTH, d_out=D_OUT, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = IN_HOOK
    cfg.metadata.hook_name_out = OUT_HOOK
    theirs = (sae_lens.SkipTranscoder if skip else sae_lens.Transcoder)(cfg)
    randomise_(theirs, seed=5)
    theirs.save_model(tmp_path)
    ours = load_sae(tmp_path)
    assert type(ours) is (SkipTranscoder if skip else ReLUTranscoder)
    assert (ours.cfg.hook, ours.cfg.output_hook, ours.d_out) == (IN_HOOK, OUT_HOOK, D_OUT)
    x, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), **TOL)


class RandomPairs:
    """A stream of normalised (input, target) batches with per-hook scales, as the trainer sees."""

    scales = {IN_HOOK: 0.37, OUT_HOOK: 2.9}

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield {IN_HOOK: torch.randn(16, D_IN, generator=g), OUT_HOOK: torch.randn(16, D_OUT)}


def test_trainer_sets_both_scales_and_a_checkpoint_restores_them(tmp_path):
    trained = make(TopKSkipTranscoder)
    trainer = Trainer([trained], TrainConfig(tokens=64, batch_size=16), tmp_path, progress=False)
    trainer.fit(RandomPairs())
    assert float(trained.activation_scale) == pytest.approx(0.37)
    assert float(trained.output_scale) == pytest.approx(2.9)
    assert trained.W_skip.abs().sum() > 0
    torch.testing.assert_close(trained.W_dec.norm(dim=-1), torch.ones(WIDTH))  # TopK's constraint
    trainer.save_checkpoint(RandomPairs())
    fresh = make(TopKSkipTranscoder, seed=9)
    assert Trainer([fresh], trainer.cfg, tmp_path, progress=False).resume(RandomPairs())
    assert float(fresh.activation_scale) == float(trained.activation_scale)
    assert float(fresh.output_scale) == float(trained.output_scale)
    for name, p in trained.named_parameters():
        assert torch.equal(getattr(fresh, name), p), name
    # The saved folder holds the folded weights: model-unit predictions survive the trip.
    x, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(load_sae(tmp_path / sae_folder_name(trained.cfg))(x), trained(x))


# ----- on a tiny Llama ---------------------------------------------------------------------------


@pytest.mark.integration
def test_training_on_a_tiny_llama_lowers_fvu(words_file, tmp_path):
    """ln2.hook_normalized → hook_mlp_out: a few dozen steps must beat the untrained transcoders
    (a TopK skip one and a ReLU one, trained side by side from one stream)."""
    model = build_tiny_model("llama")
    tokens = TokenBatches(str(words_file), build_tiny_tokenizer(), context=32, batch_size=8)
    stream = ActivationStream(model, tokens, [IN_HOOK, OUT_HOOK], batch_size=64, buffer_size=512)
    tcs = [
        cls(
            SAEConfig(
                architecture=cls.architecture,
                hook=IN_HOOK,
                output_hook=OUT_HOOK,
                expansion=4,
                k=8,
                l1_coefficient=0.1,
            ),
            64,
            d_out=64,
            seed=0,
        )
        for cls in (TopKSkipTranscoder, ReLUTranscoder)
    ]
    held_out = next(iter(stream))  # normalised (scales estimated); served, so never trained on

    def fvu(tc: Transcoder) -> float:
        with torch.no_grad():
            x, y = held_out[IN_HOOK], held_out[OUT_HOOK]
            recon = tc.predict_normalised(x, tc.encode_normalised(x))
            return float((y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum())

    before = [fvu(tc) for tc in tcs]
    train = TrainConfig(tokens=64 * 40, batch_size=64, lr=1e-2, log_every_steps=40)
    Trainer(tcs, train, tmp_path, progress=False, tensorboard=False).fit(stream)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    for tc, fvu_before, logged in zip(tcs, before, log, strict=True):
        assert float(tc.activation_scale) == pytest.approx(stream.scales[IN_HOOK])
        assert float(tc.output_scale) == pytest.approx(stream.scales[OUT_HOOK])
        after = fvu(tc)
        assert after < 0.8 * fvu_before and after < 1, tc.architecture
        # The trainer's FVU is against the target (against x_in it would be far above 1).
        assert logged["sae"] == sae_folder_name(tc.cfg) and logged["fvu"] < 1
    assert stream.scales[IN_HOOK] != pytest.approx(stream.scales[OUT_HOOK], rel=1e-2)


def exact_down_proj_transcoder(model, s_in: float, s_out: float) -> SkipTranscoder:
    """mlp.hook_post → hook_mlp_out is Llama's down_proj, a linear map: W_skip = W_down, no
    features. Trained-looking scales, with the normalised weights chosen so the folded ones are
    exact."""
    down = model.model.layers[1].mlp.down_proj.weight.detach()  # [d_model, d_mlp] = [d_out, d_in]
    cfg = SAEConfig(
        architecture="skip_transcoder",
        hook="blocks.1.mlp.hook_post",
        output_hook=OUT_HOOK,
        width=16,
    )
    tc = SkipTranscoder(cfg, down.shape[1], d_out=down.shape[0], seed=0)
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.b_dec.zero_()
        tc.W_skip.copy_(down * (s_out / s_in))
        tc.activation_scale.fill_(s_in)
        tc.output_scale.fill_(s_out)
    return tc


@pytest.mark.integration
def test_splicing_an_exact_transcoder_recovers_the_clean_loss(words_file):
    model = build_tiny_model("llama")
    tc = exact_down_proj_transcoder(model, s_in=0.5, s_out=4.0)
    assert tc.d_in == 96 and tc.d_out == 64  # d_mlp → d_model
    probe = torch.randint(3, 200, (2, 9))
    acts = run_to_hooks(model, probe, [tc.cfg.hook, OUT_HOOK])
    torch.testing.assert_close(tc(acts[tc.cfg.hook]), acts[OUT_HOOK], **TOL)

    metrics, info = evaluate_sae(
        tc,
        model,
        build_tiny_tokenizer(),
        dataset=str(words_file),
        tokens=512,
        context=32,
        batch_size=8,
        progress=False,
    )
    assert info["output_hook"] == OUT_HOOK
    assert metrics["fvu"] == pytest.approx(0, abs=1e-6)
    assert metrics["ce_loss_spliced"] == pytest.approx(metrics["ce_loss_clean"], abs=1e-5)
    assert metrics["kl"] == pytest.approx(0, abs=1e-6)
    assert metrics["ce_loss_recovered"] == pytest.approx(1, abs=1e-3)
    assert info["kl_ablated"] > 1e-4  # the ablation reached the output hook


@pytest.mark.integration
def test_identity_skip_transcoder_between_equal_hooks_is_exact_and_zero_one_is_ablation(
    words_file,
):
    """blocks.1.hook_resid_post and blocks.2.hook_resid_pre are the same tensor: W_skip = I
    reproduces it bit for bit; with W_skip = 0 and no features the splice *is* the ablation."""
    model = build_tiny_model("llama")
    cfg = SAEConfig(
        architecture="topk_skip_transcoder",
        hook="blocks.1.hook_resid_post",
        output_hook="blocks.2.hook_resid_pre",
        width=32,
        k=4,
    )
    tc = TopKSkipTranscoder(cfg, 64, d_out=64, seed=0)
    kwargs = {"dataset": str(words_file), "tokens": 256, "context": 32, "progress": False}
    with torch.no_grad():
        tc.W_dec.zero_()
        tc.W_skip.copy_(torch.eye(64))
    same, _ = evaluate_sae(tc, model, build_tiny_tokenizer(), **kwargs)
    assert same["ce_loss_spliced"] == same["ce_loss_clean"]
    assert same["fvu"] == 0 and same["ce_loss_recovered"] == 1
    with torch.no_grad():
        tc.W_skip.zero_()
    zero, _ = evaluate_sae(tc, model, build_tiny_tokenizer(), **kwargs)
    assert zero["ce_loss_spliced"] == zero["ce_loss_ablated"]
    assert zero["ce_loss_recovered"] == 0


def test_trainer_names_an_output_hook_the_stream_lacks():
    only_input = [{IN_HOOK: torch.randn(16, D_IN)}]
    trainer = Trainer([make(TopKTranscoder)], TrainConfig(tokens=16, batch_size=16), progress=False)
    with pytest.raises(SaelabError, match=OUT_HOOK.replace(".", r"\.")):
        trainer.fit(only_input)
