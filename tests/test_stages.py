"""Multi-stage runs (LAMB's mixed batch): lr restarts, batch and sequence length change, state kept."""

from __future__ import annotations

import json

import pytest
import torch

from largebatch.checkpoint import checkpoint_dirs
from largebatch.cli import plan_rows
from largebatch.sched import epochs_to_steps
from largebatch.train import train

STAGES = ["experiment=lamb_mixed_batch", "optimizer=adamw", "stages.0.batch=64", "stages.1.batch=32", "stages.0.fraction=0.5",
          "stages.1.fraction=0.5", "stages.1.warmup_fraction=0.25", "epochs=0.4", "eval_max_batches=2"]


def test_two_stage_plan_resolves_each_stage(data_cache):
    (cfg, plans, _), = plan_rows(["scale=tiny", f"data.cache_dir={data_cache}", *STAGES], world_size=1)
    first, second = plans
    assert (first.batch, first.seq_len, second.batch, second.seq_len) == (64, 32, 32, 64)
    # LEGW at each stage's batch: lr x sqrt(k), k = batch / ref_batch
    k1, k2 = 64 / cfg.scaling.ref_batch, 32 / cfg.scaling.ref_batch
    assert first.lr == pytest.approx(cfg.optimizer.lr * k1 ** 0.5)
    assert second.lr == pytest.approx(cfg.optimizer.lr * k2 ** 0.5)
    assert second.warmup_steps == epochs_to_steps(0.25 * second.epochs, second.steps_per_epoch) >= 1
    assert first.train_samples > second.train_samples  # the same text cut into longer sequences


def test_two_stage_run_restarts_the_lr_and_keeps_optimizer_state(compose_cfg, tmp_path):
    cfg = compose_cfg(*STAGES, "log_every=1")
    train(cfg, tmp_path)
    plans = json.loads((tmp_path / "plan.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    first = [m for m in steps if m["stage"] == plans[0]["name"]]
    second = [m for m in steps if m["stage"] == plans[1]["name"]]
    assert len(first) == plans[0]["total_steps"] and len(second) == plans[1]["total_steps"]
    assert first[-1]["lr"] < 0.05 * plans[0]["lr"]  # stage 1 decayed to ~0 ...
    assert second[0]["lr"] == pytest.approx(plans[1]["lr"] / plans[1]["warmup_steps"])  # ... stage 2 warms up again
    assert max(m["lr"] for m in second) == pytest.approx(plans[1]["lr"])
    assert second[0]["samples"] - first[-1]["samples"] == plans[1]["batch"]
    assert {m["stage"] for m in lines if "eval/loss" in m} == {plans[0]["name"], plans[1]["name"]}
    # the optimizer state carried over: Adam's step count is the total over both stages
    state = torch.load(checkpoint_dirs(tmp_path)[-1] / "optimizer.bin", weights_only=False)["state"]
    assert {int(s["step"]) for s in state.values()} == {plans[0]["total_steps"] + plans[1]["total_steps"]}
