"""The trainer on synthetic activations: several SAEs at once, logs, saving, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.config import SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.saes import ReLUSAE, TopKSAE
from saelab.saes.storage import load_sae
from saelab.training.checkpoint import latest_checkpoint
from saelab.training.schedules import lr_multiplier, penalty_multiplier
from saelab.training.trainer import Trainer

D_IN = 32
BATCH = 128


class SparseSyntheticStream:
    """Sums of a few of 128 fixed unit directions; resumable through ``state_dict``."""

    def __init__(self, hooks=("h",), seed=0, limit=None):
        g = torch.Generator().manual_seed(1234)
        self.directions = torch.randn(128, D_IN, generator=g)
        self.directions /= self.directions.norm(dim=-1, keepdim=True)
        self.hooks, self.seed, self.limit, self.i = hooks, seed, limit, 0
        self.scales = {h: 2.0 for h in hooks}

    def __iter__(self):
        while self.limit is None or self.i < self.limit:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
            idx = torch.randint(0, 128, (BATCH, 4), generator=g)
            coef = torch.rand(BATCH, 4, generator=g) * 3
            x = (coef[..., None] * self.directions[idx]).sum(1)
            self.i += 1
            yield {h: x for h in self.hooks}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = int(state["i"])


class Interrupt(Exception):
    pass


def two_saes(seed=0):
    return [
        TopKSAE(SAEConfig(hook="h", k=4, expansion=4, name="topk"), D_IN, seed=seed),
        ReLUSAE(
            SAEConfig(hook="h", architecture="relu", expansion=4, l1_coefficient=0.5, name="relu"),
            D_IN,
            seed=seed,
        ),
    ]


def test_schedules():
    assert lr_multiplier(0, 100, 0.1, 0.2) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 0.1, 0.2) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, 0.1, 0.2) == 1.0
    assert lr_multiplier(90, 100, 0.1, 0.2) == pytest.approx(0.5)
    assert lr_multiplier(99, 100, 0.1, 0.2) == pytest.approx(0.05)
    assert penalty_multiplier(0, 100, 0.05) == pytest.approx(0.2)
    assert penalty_multiplier(10, 100, 0.05) == 1.0
    assert penalty_multiplier(0, 100, 0.0) == 1.0


def test_several_saes_train_from_one_stream_and_are_saved(tmp_path):
    saes = two_saes()
    cfg = TrainConfig(tokens=BATCH * 150, batch_size=BATCH, lr=1e-2, log_every_steps=25)
    stream = SparseSyntheticStream()
    results = Trainer(saes, cfg, tmp_path, progress=False, tensorboard=False).fit(stream)
    assert stream.i == 150  # one pass: every batch fed both SAEs
    assert set(results) == {"topk", "relu"}
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    for name in ("topk", "relu"):
        curve = [r for r in records if r["sae"] == name]
        assert len(curve) == 6
        assert curve[-1]["fvu"] < 0.7 * curve[0]["fvu"]  # it learns
        assert curve[-1]["tokens"] == BATCH * 150
        loaded = load_sae(tmp_path / name)
        x = next(iter(SparseSyntheticStream()))["h"] / 2.0  # raw units
        expected = saes[0 if name == "topk" else 1](x)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
    # TopK keeps 4 per token; ReLU may zero a kept negative pre-activation.
    assert all(3.0 < r["l0"] <= 4.0 for r in records if r["sae"] == "topk")
    # The stream's scale is stored and folded: the saved SAE works in raw units.
    assert json.loads((tmp_path / "topk" / "cfg.json").read_text())["saelab"][
        "activation_scale_folded"
    ] == pytest.approx(2.0)


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    cfg = TrainConfig(
        tokens=BATCH * 40, batch_size=BATCH, lr=3e-3, checkpoint_every_tokens=BATCH * 15
    )
    torch.manual_seed(0)
    straight = two_saes()
    Trainer(straight, cfg, tmp_path / "a", progress=False, tensorboard=False).fit(
        SparseSyntheticStream()
    )

    torch.manual_seed(0)
    interrupted_dir = tmp_path / "b"
    first = Trainer(two_saes(), cfg, interrupted_dir, progress=False, tensorboard=False)

    class DiesAfter(SparseSyntheticStream):
        def __iter__(self):
            for batch in super().__iter__():
                if self.i > 34:
                    raise Interrupt
                yield batch

    with pytest.raises(Interrupt):
        first.fit(DiesAfter())
    assert latest_checkpoint(interrupted_dir).name == "step_00000030"
    assert len(list((interrupted_dir / "checkpoints").glob("step_*"))) == 2  # older ones pruned

    resumed_saes = two_saes(seed=99)  # different init: everything must come from the checkpoint
    second = Trainer(resumed_saes, cfg, interrupted_dir, progress=False, tensorboard=False)
    stream = SparseSyntheticStream()
    assert second.resume(stream)
    assert second.step == 30 and stream.i == 30
    second.fit(stream)
    for a, b in zip(straight, resumed_saes, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


def test_resume_without_checkpoint_returns_false(tmp_path):
    trainer = Trainer(two_saes(), TrainConfig(tokens=BATCH), tmp_path, progress=False)
    assert not trainer.resume(SparseSyntheticStream())


def test_a_stream_that_runs_out_is_a_clear_error(tmp_path):
    cfg = TrainConfig(tokens=BATCH * 10, batch_size=BATCH)
    trainer = Trainer(two_saes(), cfg, None, progress=False)
    with pytest.raises(SaelabError, match="ran out after 640 tokens"):
        trainer.fit(SparseSyntheticStream(limit=5))


def test_wrong_width_or_missing_hook_is_a_clear_error():
    cfg = TrainConfig(tokens=BATCH, batch_size=BATCH)
    wide = [TopKSAE(SAEConfig(hook="h", k=4), D_IN * 2)]
    with pytest.raises(SaelabError, match="d_in=64 but hook h gives width 32"):
        Trainer(wide, cfg, None, progress=False).fit(SparseSyntheticStream())
    other = [TopKSAE(SAEConfig(hook="other", k=4), D_IN)]
    with pytest.raises(SaelabError, match="needs hook 'other'"):
        Trainer(other, cfg, None, progress=False).fit(SparseSyntheticStream())


def test_dead_features_are_counted_by_token_window():
    sae = TopKSAE(SAEConfig(hook="h", k=2, expansion=4, dead_window_tokens=BATCH * 3), D_IN)
    trainer = Trainer([sae], TrainConfig(tokens=BATCH * 6, batch_size=BATCH), None, progress=False)
    trainer.fit(SparseSyntheticStream())
    state = trainer.states[0]
    fired_recently = state.tokens_since_fired_F < BATCH * 3
    assert torch.equal(state.dead_F(), ~fired_recently)
    assert int(state.fired_total_F.sum()) <= BATCH * 6 * 2
