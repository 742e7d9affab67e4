"""The shared trainer: step contract, schedule, accumulation, EMA and the NaN guard.

These use a tiny two-objective family shaped like a GAN (two parameter groups,
several critic updates per generator update) to prove that the trainer serves
more than GPT without knowing any family's mathematics.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from aigc.config import Config, TrainConfig
from aigc.errors import ConfigError, TrainingError
from aigc.runs import RunDir
from aigc.tasks.base import Task
from aigc.trainer import EMA, DistInfo, Trainer, lr_factor


class TwoPlayer(nn.Module):
    """A critic and a generator with separate optimizers, alternating like a GAN."""

    def __init__(self, n_critic: int = 3, nan_at: set[int] | None = None):
        super().__init__()
        self.critic = nn.Linear(4, 1)
        self.gen = nn.Linear(2, 4)
        self.n_critic = n_critic
        self.nan_at = nan_at or set()
        self.calls: list[str] = []

    def param_groups(self):
        return {"critic": self.critic.parameters(), "generator": self.gen.parameters()}

    def training_step(self, batch, step):
        x, z = batch["x"], batch["z"]
        for _ in range(self.n_critic):
            d_loss = self.critic(self.gen(z).detach()).mean() - self.critic(x).mean()
            step.update("critic", d_loss)
            self.calls.append("critic")
        g_loss = -self.critic(self.gen(z)).mean()
        if step.index in self.nan_at:
            g_loss = g_loss * float("nan")
        step.update("generator", g_loss)
        self.calls.append("generator")
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


class ToyTask(Task):
    """The task contract, the least of it: the trainer asks for nothing more."""

    name = "toy"
    item_name = "items"
    pipeline_class = ""  # never loaded here
    headline_metric = "n"
    loss_keys = frozenset({"d_loss", "g_loss"})

    def __init__(self, model, batch=8):
        self.model = model
        self.items_per_batch = batch
        self.batch = batch

    @classmethod
    def prepare_data(cls, config, data_dir, progress=True):
        raise NotImplementedError

    @classmethod
    def finish_config(cls, config, files):
        raise NotImplementedError

    @classmethod
    def open(cls, config, run, with_data=True):
        raise NotImplementedError

    def train_batch(self, step, micro, rank, world):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(self.batch, 4, generator=g) + 2.0
        return {"x": x, "z": torch.randn(self.batch, 2, generator=g)}

    def eval_sums(self, model, rank, world, device):
        return {"n": 1.0}

    def eval_metrics(self, sums):
        return {"n": sums["n"]}

    def samples(self, model, step, device):
        return {}


def _trainer(tmp_path, model, **train):
    cfg = Config(
        family="toy", data=None, model=None, train=TrainConfig(**{"log_every": 1, **train})
    )
    run = RunDir(tmp_path / "run")
    run.create("toy", "family: toy\n")
    return Trainer(ToyTask(model), cfg, run, DistInfo(), torch.device("cpu"))


def test_two_groups_alternate_with_separate_optimizers(tmp_path):
    torch.manual_seed(0)
    model = TwoPlayer(n_critic=3)
    t = _trainer(tmp_path, model, max_steps=4, warmup_steps=0, eval_every=0, checkpoint_every=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t.fit()
    assert model.calls == (["critic"] * 3 + ["generator"]) * 4
    assert set(t.groups) == {"critic", "generator"}
    assert t.groups["critic"].optimizer is not t.groups["generator"].optimizer
    for k in ("critic.weight", "gen.weight", "gen.bias"):  # critic.bias cancels in d_loss
        assert not torch.equal(model.state_dict()[k], before[k]), f"{k} was never updated"
    rows = [r for r in t.run.read_metrics() if "d_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "grad_norm/critic" in rows[0] and "grad_norm/generator" in rows[0]
    assert (t.run.latest_checkpoint() / "optim.safetensors").is_file()


def test_grad_accum_refused_for_multi_group_family(tmp_path):
    with pytest.raises(ConfigError, match="grad_accum"):
        _trainer(tmp_path, TwoPlayer(), grad_accum=2)


def test_nan_guard_skips_counts_then_stops(tmp_path):
    torch.manual_seed(0)
    model = TwoPlayer(n_critic=1, nan_at={2})
    t = _trainer(tmp_path, model, max_steps=5, warmup_steps=0, eval_every=0, checkpoint_every=0)
    t.fit()
    assert t.nonfinite_total == 1 and t.nonfinite_in_a_row == 0
    rows = {r["step"]: r for r in t.run.read_metrics() if "d_loss" in r}
    assert rows[3]["skipped"] == ["generator"]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model = TwoPlayer(n_critic=1, nan_at=set(range(100)))
    t = _trainer(tmp_path / "b", model, max_steps=50, nan_tolerance=3, checkpoint_every=0)
    gen_before = model.gen.weight.detach().clone()
    with pytest.raises(TrainingError, match=r"non-finite for 3 steps in a row \(last at step 3"):
        t.fit()
    assert torch.equal(model.gen.weight, gen_before)  # skipped updates left it untouched


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 110, 1.0) == pytest.approx(0.1)
    const = TrainConfig(schedule="constant", warmup_steps=0)
    assert lr_factor(const, 50, 0.7) == 1.0


def test_time_budget_stops_training(tmp_path):
    torch.manual_seed(0)
    t = _trainer(
        tmp_path, TwoPlayer(), max_steps=10**9, max_time=0.5, warmup_steps=0, checkpoint_every=0
    )
    result = t.fit()
    assert 0.5 <= result.train_time < 5
    assert t.run.latest_checkpoint().name == f"step-{result.step:08d}"


def test_ema_matches_an_independent_recurrence():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    ema = EMA(lin, decay=0.9)
    expected = lin.weight.detach().clone()
    for _ in range(5):
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight))
        ema.update()
        expected = 0.9 * expected + 0.1 * lin.weight.detach()
    assert torch.allclose(ema.shadow["weight"], expected, atol=1e-6)
    current = lin.weight.detach().clone()
    with ema.applied():
        assert torch.allclose(lin.weight, expected, atol=1e-6)
    assert torch.equal(lin.weight, current)


def test_cosine_progress_is_monotone():
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0)
    values = [lr_factor(cfg, s, s / 100) for s in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.0, abs=1e-12) and not math.isnan(np.sum(values))


def test_ema_warms_up_and_averages_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(net, decay=0.999)
    assert "1.running_mean" in ema.names  # batch-norm statistics follow the weights
    expected = {n: t.detach().clone() for n, t in net.state_dict().items() if n in ema.names}
    for step in range(20):
        net(torch.randn(8, 3))  # moves the running statistics (train mode)
        with torch.no_grad():
            net[0].weight.add_(torch.randn_like(net[0].weight))
        ema.update(step)
        d = min(0.999, (1 + step) / (10 + step))  # warm-up: the first steps weigh heavily
        live = net.state_dict()
        expected = {n: d * expected[n] + (1 - d) * live[n] for n in expected}
    for n in ema.names:
        assert torch.allclose(ema.shadow[n], expected[n], atol=1e-5), n
    with ema.applied():
        assert torch.allclose(net[1].running_mean, expected["1.running_mean"], atol=1e-5)
    assert torch.allclose(net[1].running_mean, net.state_dict()["1.running_mean"])


class LateTerm(TwoPlayer):
    """Logs a scalar equal to the step index only from step 2 on, like a loss term
    switched on during training."""

    def training_step(self, batch, step):
        out = super().training_step(batch, step)
        if step.index >= 2:
            out["late"] = torch.tensor(float(step.index))
        return out


def test_a_scalar_that_starts_mid_window_is_averaged_over_its_own_steps(tmp_path):
    model = LateTerm(n_critic=1)
    t = _trainer(tmp_path, model, max_steps=4, log_every=4, warmup_steps=0, eval_every=0,
                 checkpoint_every=0)  # fmt: skip
    t.fit()
    (row,) = [r for r in t.run.read_metrics() if "d_loss" in r]
    assert row["late"] == pytest.approx((2 + 3) / 2)  # not (2 + 3) / 4
