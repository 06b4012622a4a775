"""The learning-rate schedule and the sparsity warm-up, read from a real training run (not from the formula)."""

from __future__ import annotations

import lightning as L
import pytest

from tests.conftest import compose_train
from train import train

RECORDED: dict[str, dict[int, float]] = {}


class RecordSchedule(L.Callback):
    """The learning rate the optimiser steps with, and the sparsity coefficient the loss used, per step."""

    def on_train_start(self, trainer, pl_module):
        RECORDED.clear()
        RECORDED.update(lr={}, threshold_lr={}, l1_coef={})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        RECORDED["lr"][trainer.global_step] = optimizer.param_groups[0]["lr"]
        if len(optimizer.param_groups) > 1:
            RECORDED["threshold_lr"][trainer.global_step] = optimizer.param_groups[1]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the value training_step logged: the coefficient its loss was computed with (global_step has moved on)
        RECORDED["l1_coef"][trainer.global_step - 1] = float(trainer.callback_metrics["train/l1_coef"])


def approx(value: float):
    return pytest.approx(value, rel=1e-6)


def test_optimiser_lr_and_l1_coef_follow_the_configured_schedule(toy_dataset, tmp_path):
    # crosscoder=paper: two parameter groups (JumpReLU thresholds at 0.1x lr), the schedule is shared code
    lr, final, l1 = 0.01, 1 / 32, 2.0
    # 40 steps: lr warm-up over steps 0-7, constant until step 24, then decay to lr/32 at step 39 (the last);
    # the sparsity coefficient rises over steps 0-9 (fractions of max_steps, as in the presets)
    cfg = compose_train([f"data.path={toy_dataset}", "crosscoder=paper", "data.batch_size=32",
                         "data.shuffle_buffer=128", "crosscoder.d_sae=16", "trainer.max_steps=40",
                         "trainer.val_check_interval=40", "trainer.log_every_n_steps=1", "logger=none",
                         "callbacks.progress_bar.refresh_rate=0", f"crosscoder.lr={lr}",
                         "crosscoder.lr_warmup_steps=0.2", "crosscoder.lr_decay_start=0.6",
                         f"crosscoder.lr_final_factor={final}", "crosscoder.l1_warmup_steps=0.25",
                         f"crosscoder.l1_coef={l1}", "crosscoder.threshold_lr_factor=0.1",
                         "+callbacks.schedule._target_=tests.test_schedule.RecordSchedule"], tmp_path / "run")
    train(cfg)
    got, coef = RECORDED["lr"], RECORDED["l1_coef"]
    assert sorted(got) == sorted(coef) == list(range(40))  # one optimiser step per batch
    assert got[0] == approx(lr / 8)  # step 0: the first of 8 warm-up steps
    assert got[3] == approx(lr * 4 / 8)  # mid warm-up
    assert got[7] == approx(lr)  # end of warm-up: the full rate
    assert [got[s] for s in range(7, 25)] == [approx(lr)] * 18  # constant up to and at the decay start
    assert got[25] < lr
    assert got[39] == approx(lr * final)  # the last step uses exactly lr * lr_final_factor
    assert all(got[s + 1] < got[s] for s in range(24, 39))  # linear decay, without a plateau
    assert got[32] == approx(lr * (1 - (32 - 24) / (39 - 24) * (1 - final)))
    thr = RECORDED["threshold_lr"]  # JumpReLU thresholds follow the same schedule at their own rate
    assert [thr[s] for s in (0, 3, 7, 24, 32, 39)] == [approx(0.1 * got[s]) for s in (0, 3, 7, 24, 32, 39)]

    assert coef[0] == approx(l1 / 10)  # sparsity warm-up over 10 steps
    assert coef[4] == approx(l1 * 5 / 10)
    assert coef[9] == approx(l1)  # end of warm-up: the configured coefficient
    assert [coef[s] for s in range(9, 40)] == [approx(l1)] * 31


class _FakeTrainer:
    max_steps = 40


@pytest.mark.parametrize("decay_start,start", [(1.0, 40), (1, 1), (0.5, 20), (39, 39)])
def test_a_float_one_is_the_end_of_training_not_step_one(decay_start, start):
    """lr_decay_start=1.0 reads as the whole run (no decay), 1 as step 1: the float/int rule of every schedule key."""
    from crosscoder.module import CrosscoderModule
    module = CrosscoderModule(2, 8, d_sae=16, lr_warmup_steps=0, lr_decay_start=decay_start, lr_final_factor=1 / 32)
    module._trainer = _FakeTrainer()
    assert module._steps(decay_start) == start
    assert module.lr_factor(20) == approx(1.0 if start > 20 else 1 - (20 - start) / (39 - start) * (1 - 1 / 32))
    assert module.lr_factor(39) == approx(1.0 if start > 39 else 1 / 32)


@pytest.mark.parametrize("key,value", [("lr_decay_start", 1.5), ("lr_warmup_steps", -1), ("l1_warmup_steps", -0.1)])
def test_a_schedule_key_that_is_neither_a_step_nor_a_fraction_is_named(key, value):
    from crosscoder.module import CrosscoderModule
    with pytest.raises(ValueError, match=rf"crosscoder.{key}={value}: give a step count"):
        CrosscoderModule(2, 8, d_sae=16, **{key: value})
