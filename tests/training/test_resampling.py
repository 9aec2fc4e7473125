"""Dead-feature resampling (METHODS §1.1): the weight surgery, the input draw, the schedule, the
LR warm-up, its effect on dead features, and exact resume across a resample."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes import ReLUSAE, TopKSAE, architecture_class
from saelab.training.checkpoint import latest_checkpoint
from saelab.training.resampling import (
    ENCODER_NORM_FACTOR,
    LOSS_EXPONENTS,
    FeatureResampler,
    InputReservoir,
    check_resamplable,
    collects_at,
    input_log_weights,
    resample_due,
    resample_features_,
)
from saelab.training.schedules import lr_multiplier, resample_lr_multiplier
from saelab.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN = 16
MOMENTS = ("exp_avg", "exp_avg_sq")


# ----- the weight surgery -------------------------------------------------------------------------


def _trained_sae(arch: str, apply_b_dec: bool) -> tuple[torch.nn.Module, torch.optim.Adam]:
    """A small SAE with random non-zero weights and Adam moments from two real steps."""
    cfg = SAEConfig(hook="h", architecture=arch, width=12, k=3, l1_coefficient=0.1)
    cls = ReLUSAE if arch == "relu" else TopKSAE
    sae = cls(cfg, D_IN, apply_b_dec_to_input=apply_b_dec, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.mul_(torch.rand(sae.W_enc.shape, generator=g) + 0.5)
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(2):
        sae.training_step(torch.randn(32, D_IN, generator=g)).loss.backward()
        opt.step()
        opt.zero_grad()
    return sae, opt


@pytest.mark.parametrize(
    ("arch", "apply_b_dec"), [("relu", False), ("relu", True), ("topk", True), ("topk", False)]
)
def test_resampled_features_follow_the_recipe_and_only_their_adam_moments_reset(arch, apply_b_dec):
    sae, opt = _trained_sae(arch, apply_b_dec)
    dead_F = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead_F[[1, 4, 9]] = True
    inputs_ND = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(8)) * 4
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {
        (n, key): opt.state[p][key].clone() for n, p in sae.named_parameters() for key in MOMENTS
    }
    alive_norm = sae.W_enc.detach().norm(dim=0)[~dead_F].mean()

    idx = resample_features_(sae, opt, dead_F, inputs_ND)

    assert idx.tolist() == [1, 4, 9]
    centred_ND = inputs_ND - before["b_dec"] if apply_b_dec else inputs_ND
    unit_ND = centred_ND / centred_ND.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.detach()[idx], unit_ND)
    torch.testing.assert_close(sae.W_dec.detach()[idx].norm(dim=-1), torch.ones(3))
    enc_IN = sae.W_enc.detach()[:, idx].T
    torch.testing.assert_close(enc_IN.norm(dim=-1), ENCODER_NORM_FACTOR * alive_norm.expand(3))
    torch.testing.assert_close(enc_IN / enc_IN.norm(dim=-1, keepdim=True), unit_ND)
    assert not sae.b_enc.detach()[idx].any()
    keep_F = ~dead_F
    params = dict(sae.named_parameters())
    for name, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0)):
        kept = before[name].index_select(dim, keep_F.nonzero().squeeze(-1))
        assert torch.equal(
            params[name].detach().index_select(dim, keep_F.nonzero().squeeze(-1)), kept
        )
        for key in MOMENTS:
            state = opt.state[params[name]][key]
            assert not state.index_select(dim, idx).any(), (name, key)
            old = moments[(name, key)].index_select(dim, keep_F.nonzero().squeeze(-1))
            assert old.abs().sum() > 0
            assert torch.equal(state.index_select(dim, keep_F.nonzero().squeeze(-1)), old)
    assert torch.equal(sae.b_dec.detach(), before["b_dec"])
    for key in MOMENTS:
        assert torch.equal(opt.state[params["b_dec"]][key], moments[("b_dec", key)])


def test_fewer_inputs_than_dead_features_resamples_the_first_dead_ones():
    sae, opt = _trained_sae("relu", False)
    dead_F = torch.zeros(sae.d_sae, dtype=torch.bool)
    dead_F[[2, 5, 7]] = True
    W_dec = sae.W_dec.detach().clone()
    idx = resample_features_(sae, opt, dead_F, torch.randn(2, D_IN))
    assert idx.tolist() == [2, 5]
    assert torch.equal(sae.W_dec.detach()[7], W_dec[7])
    assert resample_features_(sae, opt, dead_F, torch.zeros(0, 0)).numel() == 0


def test_architectures_with_extra_per_feature_parameters_are_refused():
    class WithGate(ReLUSAE):
        def add_parameters_(self) -> None:
            self.b_gate = torch.nn.Parameter(torch.zeros(self.d_sae))

    sae = WithGate(SAEConfig(hook="h", architecture="relu", width=8), D_IN)
    with pytest.raises(SaelabError, match="b_gate; set train.resample_every_steps = 0") as err:
        check_resamplable(sae)
    assert "\n" not in str(err.value)
    cfg = TrainConfig(tokens=64, batch_size=8, resample_every_steps=2)
    with pytest.raises(SaelabError):
        Trainer([sae], cfg, None, progress=False)
    Trainer([sae], TrainConfig(tokens=64, batch_size=8), None, progress=False)  # off: fine
    # A transcoder's decoder writes another hook, even when the two widths agree.
    cfg = SAEConfig(hook="h", architecture="transcoder", output_hook="o", width=8)
    transcoder = architecture_class("transcoder")(cfg, D_IN, d_out=D_IN)
    with pytest.raises(SaelabError, match="separate output"):
        check_resamplable(transcoder)


# ----- which inputs are drawn ---------------------------------------------------------------------


def _draw(losses: list[float], n: int, trial: int, weighting="loss_squared", split=2) -> list[int]:
    """Indices (rows hold their own index) drawn by a fresh reservoir fed in ``split`` batches."""
    x_ND = torch.arange(len(losses), dtype=torch.float32)[:, None].expand(-1, 3)
    log_w = input_log_weights(torch.tensor(losses), weighting)
    reservoir = InputReservoir(capacity=len(losses))
    for part, (x, lw) in enumerate(zip(x_ND.chunk(split), log_w.chunk(split), strict=True)):
        reservoir.offer_(x, lw, torch.Generator().manual_seed(trial * 7 + part))
    return reservoir.sample(n)[:, 0].long().tolist()


LOSSES = [0.0, 1.0, 2.0, 3.0, 0.0, 4.0]


@pytest.mark.parametrize("weighting", sorted(LOSS_EXPONENTS))
def test_single_draws_follow_the_weighting_and_zero_loss_is_never_chosen(weighting):
    trials = 2000
    counts = torch.zeros(len(LOSSES))
    for trial in range(trials):
        (chosen,) = _draw(LOSSES, 1, trial, weighting)
        counts[chosen] += 1
    w = torch.tensor(LOSSES) ** LOSS_EXPONENTS[weighting]
    p = w / w.sum()
    if weighting != "uniform":
        assert counts[0] == 0 and counts[4] == 0
    # Each count is binomial: within 4.5 standard deviations of its expectation.
    sd = (trials * p * (1 - p)).sqrt()
    assert ((counts - trials * p).abs() <= 4.5 * sd + 1e-9).all(), (counts / trials, p)


def test_ordered_pairs_follow_successive_sampling_without_replacement():
    """P(first = i, second = j) = p_i · p_j / (1 − p_i) for draws ∝ ℓ² without replacement."""
    losses = [1.0, 2.0, 3.0]
    p = torch.tensor(losses) ** 2 / sum(v**2 for v in losses)
    trials = 2000
    counts: dict[tuple[int, int], int] = {}
    for trial in range(trials):
        first, second = _draw(losses, 2, trial, split=3)
        assert first != second
        counts[(first, second)] = counts.get((first, second), 0) + 1
    for i in range(3):
        for j in range(3):
            if i == j:
                continue
            q = float(p[i] * p[j] / (1 - p[i]))
            sd = math.sqrt(trials * q * (1 - q))
            assert abs(counts.get((i, j), 0) - trials * q) <= 4.5 * sd, (i, j, counts)


def test_reservoir_in_batches_keeps_the_top_keys_of_everything_offered():
    """Naive reference: every key of the stream at once, the top ``capacity`` kept."""
    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(40, 5, generator=g)
    log_w_N = torch.randn(40, generator=g)
    log_w_N[::7] = -math.inf
    reservoir = InputReservoir(capacity=6)
    keys = []
    for part, (x, lw) in enumerate(zip(x_ND.chunk(5), log_w_N.chunk(5), strict=True)):
        reservoir.offer_(x, lw, torch.Generator().manual_seed(part))
        noise = torch.empty(x.shape[0], dtype=torch.float64)
        noise.exponential_(generator=torch.Generator().manual_seed(part)).clamp_min_(1e-300)
        keys.append(lw.double() - noise.log())
    expected = x_ND[torch.cat(keys).topk(6).indices]
    torch.testing.assert_close(reservoir.sample(6), expected)
    assert len(reservoir) == 6
    reservoir.clear_()
    assert len(reservoir) == 0 and reservoir.sample(3).numel() == 0


# ----- when, and the learning rate ----------------------------------------------------------------


def test_resample_steps_and_the_sampling_window():
    cfg = TrainConfig(
        tokens=100 * 10,
        batch_size=10,
        resample_every_steps=20,
        resample_until_frac=0.65,
        resample_sample_tokens=35,
    )
    assert [s for s in range(101) if resample_due(s, cfg)] == [20, 40, 60]
    # ceil(35 / 10) = 4 steps of inputs before each event (0-based indices of the steps).
    assert [s for s in range(100) if collects_at(s, cfg)] == [
        16,
        17,
        18,
        19,
        36,
        37,
        38,
        39,
        56,
        57,
        58,
        59,
    ]
    assert cfg.resample_window_tokens == 20 * 10 // 2
    last = TrainConfig(tokens=40, batch_size=10, resample_every_steps=2, resample_until_frac=1.0)
    assert not resample_due(4, last)  # never after the final step
    assert not any(resample_due(s, TrainConfig(tokens=40, batch_size=10)) for s in range(5))


def test_lr_after_a_resample_warms_up_from_a_tenth_along_a_cosine():
    assert resample_lr_multiplier(0, 100) == pytest.approx(0.1)
    assert resample_lr_multiplier(100, 100) == 1.0
    assert resample_lr_multiplier(5000, 100) == 1.0
    assert resample_lr_multiplier(None, 100) == 1.0
    assert resample_lr_multiplier(3, 0) == 1.0
    values = [resample_lr_multiplier(t, 100) for t in range(101)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    for t in (10, 25, 50, 80):
        cosine = 0.1 + 0.9 * (1 - math.cos(math.pi * t / 100)) / 2
        assert resample_lr_multiplier(t, 100) == pytest.approx(cosine)
    assert resample_lr_multiplier(50, 100) == pytest.approx(0.55)


# ----- in the trainer -----------------------------------------------------------------------------

BATCH = 256
N_DIRECTIONS = 512


class SparseStream:
    """Each token a sum of 4 of 512 fixed unit directions in R^32 with weights in [0, 3):
    more directions than features, so a dead feature is an optimisation failure, not a choice."""

    def __init__(self, seed=0, d_in=32):
        g = torch.Generator().manual_seed(1234)
        self.directions = torch.randn(N_DIRECTIONS, d_in, generator=g)
        self.directions /= self.directions.norm(dim=-1, keepdim=True)
        self.seed, self.i = seed, 0

    def batch(self, i):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        idx = torch.randint(0, N_DIRECTIONS, (BATCH, 4), generator=g)
        coef = torch.rand(BATCH, 4, generator=g) * 3
        return (coef[..., None] * self.directions[idx]).sum(1)

    def __iter__(self):
        while True:
            x = self.batch(self.i)
            self.i += 1
            yield {"h": x}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


def _bricken_relu(l1: float, seed: int = 0, name: str = "relu") -> ReLUSAE:
    """Towards-Monosemanticity ReLU SAE: unit-norm decoder, pre-encoder bias, plain L1."""
    cfg = SAEConfig(
        hook="h",
        architecture="relu",
        expansion=4,
        l1_coefficient=l1,
        decoder_unit_norm=True,
        apply_b_dec_to_input=True,
        name=name,
    )
    return ReLUSAE(cfg, 32, seed=seed)


def _never_fired_fraction(sae) -> float:
    held_out = torch.cat([SparseStream(seed=999).batch(i) for i in range(4)])
    return float(1 - (sae.encode(held_out) > 0).any(0).double().mean())


def test_resampling_revives_dead_features_at_equal_tokens(tmp_path):
    """The claim: with a deliberately high L1, most features die; resampling every 25 steps (up
    to 3/4 of the run) leaves far fewer dead on held-out tokens at the same token budget."""
    base = dict(tokens=BATCH * 300, batch_size=BATCH, lr=1e-2, lr_warmup_frac=0.0)
    resampling = dict(
        resample_every_steps=25,
        resample_until_frac=0.75,
        resample_sample_tokens=BATCH * 5,
        resample_lr_warmup_steps=8,
    )
    dead = {}
    for label, extra in (("plain", {}), ("resampled", resampling)):
        torch.manual_seed(0)
        sae = _bricken_relu(l1=3.0)
        out = tmp_path / label
        Trainer([sae], TrainConfig(**base, **extra), out, progress=False, tensorboard=False).fit(
            SparseStream()
        )
        dead[label] = _never_fired_fraction(sae)
        records = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        events = [r for r in records if r.get("event") == "resample"]
        if label == "plain":
            assert not events
        else:
            assert [e["step"] for e in events] == [25, 50, 75, 100, 125, 150, 175, 200, 225]
            assert set(events[0]) == {"event", "step", "tokens", "sae", "n_dead", "n_resampled"}
            assert sum(e["n_resampled"] for e in events) > 0
            assert all(e["n_resampled"] == e["n_dead"] for e in events)
            assert all(e["tokens"] == e["step"] * BATCH for e in events)
    assert dead["plain"] > 0.5  # the setting does kill features
    assert dead["resampled"] < dead["plain"] - 0.3, dead


def test_trainer_lr_follows_the_resample_warm_up(tmp_path):
    cfg = TrainConfig(
        tokens=BATCH * 30,
        batch_size=BATCH,
        lr=1e-2,
        resample_every_steps=10,
        resample_until_frac=1.0,
        resample_dead_window_tokens=BATCH * 3,
        resample_sample_tokens=BATCH * 3,
        resample_lr_warmup_steps=4,
    )
    torch.manual_seed(0)
    sae = _bricken_relu(l1=1.0)
    with torch.no_grad():
        sae.b_enc[:20] = -100.0  # dead from the start: resampled at step 10
    trainer = Trainer([sae], cfg, tmp_path, progress=False, tensorboard=False)
    lrs = []
    original = trainer._train_step

    def spy(state, x_BD, *args):
        out = original(state, x_BD, *args)
        lrs.append(state.last_losses["lr"])
        return out

    trainer._train_step = spy
    trainer.fit(SparseStream())
    records = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    events = [r["step"] for r in records if r.get("event") == "resample" and r["n_resampled"]]
    assert events[0] == 10
    assert trainer.states[0].resampler.last_resample_step == events[-1]
    for step, lr in enumerate(lrs):
        schedule = 1e-2 * lr_multiplier(step, 30, cfg.lr_warmup_frac, cfg.lr_decay_frac)
        since = min((step - e for e in events if e <= step), default=None)
        assert lr == pytest.approx(schedule * resample_lr_multiplier(since, 4)), step
    assert lrs[10] == pytest.approx(0.1 * 1e-2)
    assert lrs[14] == pytest.approx(1e-2)


def test_resume_across_resamples_is_bit_exact(tmp_path):
    """Checkpoint inside a sampling window, just after a resample (LR still warming up)."""
    cfg = TrainConfig(
        tokens=BATCH * 50,
        batch_size=BATCH,
        lr=1e-2,
        checkpoint_every_tokens=BATCH * 12,
        resample_every_steps=10,
        resample_until_frac=1.0,
        resample_dead_window_tokens=BATCH * 4,
        resample_sample_tokens=BATCH * 6,
        resample_lr_warmup_steps=10,
    )

    def saes(seed=0):
        topk = TopKSAE(SAEConfig(hook="h", k=4, expansion=2, name="topk"), 32, seed=seed)
        return [_bricken_relu(l1=10.0, seed=seed), topk]

    torch.manual_seed(0)
    straight = saes()
    Trainer(straight, cfg, tmp_path / "a", progress=False, tensorboard=False).fit(SparseStream())

    class Interrupt(Exception):
        pass

    class DiesAfter(SparseStream):
        def __iter__(self):
            for batch in super().__iter__():
                if self.i > 38:
                    raise Interrupt
                yield batch

    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        Trainer(saes(), cfg, tmp_path / "b", progress=False, tensorboard=False).fit(DiesAfter())
    assert latest_checkpoint(tmp_path / "b").name == "step_00000036"

    torch.manual_seed(123)  # a different global seed: the resampling seed comes from the checkpoint
    resumed = saes(seed=99)
    second = Trainer(resumed, cfg, tmp_path / "b", progress=False, tensorboard=False)
    stream = SparseStream()
    assert second.resume(stream)
    relu_state = second.states[0].resampler
    assert relu_state.last_resample_step == 30 and len(relu_state.reservoir) > 0
    second.fit(stream)
    for a, b in zip(straight, resumed, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    events_a = [r for r in map(json.loads, log_a) if r.get("event") == "resample"]
    assert [e["step"] for e in events_a if e["sae"] == "relu"] == [10, 20, 30, 40]
    assert sum(e["n_resampled"] for e in events_a if e["step"] == 40) > 0  # after the resume too


def test_resampler_state_round_trips():
    sae = _bricken_relu(l1=1.0)
    cfg = TrainConfig(tokens=BATCH * 10, batch_size=BATCH, resample_every_steps=5)
    resampler = FeatureResampler(cfg, sae, seed=4)
    x = SparseStream().batch(0)
    resampler.offer_(3, x, torch.zeros_like(x))
    resampler.last_resample_step = 2
    other = FeatureResampler(cfg, sae, seed=0)
    other.load_state_dict(resampler.state_dict())
    assert other.seed == 4 and other.last_resample_step == 2
    assert torch.equal(other.reservoir.sample(5), resampler.reservoir.sample(5))
