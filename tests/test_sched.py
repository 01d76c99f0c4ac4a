"""Scaling rules, epoch->step conversion, lr schedules and their configs (largebatch.sched)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from largebatch.errors import ConfigError
from largebatch.sched import (
    RULES,
    SCHEDULES,
    apply_scaling,
    build_schedule,
    epochs_to_steps,
    steps_per_epoch,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---------------------------------------------------------------- epochs -> steps


def test_steps_per_epoch_drops_the_partial_tail_batch():
    assert steps_per_epoch(1000, 300) == 3
    assert steps_per_epoch(1200, 300) == 4
    assert steps_per_epoch(512, 512) == 1


def test_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError, match=r"batch 2048 is larger than the training set \(1000 samples\)"):
        steps_per_epoch(1000, 2048)
    with pytest.raises(ConfigError):
        steps_per_epoch(1000, 0)


def test_epochs_to_steps_rounds_and_never_loses_a_nonzero_duration():
    assert epochs_to_steps(0, 100) == 0
    assert epochs_to_steps(1e-6, 100) == 1  # tiny but non-zero warmup keeps one step
    assert epochs_to_steps(0.25, 10) == 3  # 2.5 rounds half up, not to even
    assert epochs_to_steps(2.0, 15625) == 31250
    assert epochs_to_steps(1 / 320, 1_000_000) == 3125
    with pytest.raises(ConfigError, match="epochs"):
        epochs_to_steps(-1.0, 10)


# ---------------------------------------------------------------- scaling rules


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_the_identity_at_ref_batch(rule):
    s = apply_scaling(rule, batch=512, ref_batch=512, ref_lr=6.25e-4, ref_warmup_epochs=0.1)
    assert (s.rule, s.k, s.lr, s.warmup_epochs) == (rule, 1.0, 6.25e-4, 0.1)
    assert (s.lr_factor, s.warmup_factor) == (1.0, 1.0)


@pytest.mark.parametrize(
    "rule, lr, warmup",
    [("none", 1e-3, 0.5), ("linear", 4e-3, 0.5), ("sqrt", 2e-3, 0.5), ("legw", 2e-3, 2.0)],
)
def test_rule_factors_at_four_times_the_batch(rule, lr, warmup):
    s = apply_scaling(rule, batch=1024, ref_batch=256, ref_lr=1e-3, ref_warmup_epochs=0.5)
    assert s.k == 4.0
    assert s.lr == pytest.approx(lr, rel=1e-12)
    assert s.warmup_epochs == pytest.approx(warmup, rel=1e-12)


def test_lamb_untuned_sqrt_lr_at_32k():
    # LAMB's untuned recipe: 6.25e-4 at 512 -> 6.25e-4 * sqrt(64) = 5e-3 at 32768.
    s = apply_scaling("sqrt", batch=32768, ref_batch=512, ref_lr=6.25e-4, ref_warmup_epochs=0.0)
    assert s.lr == pytest.approx(5e-3, rel=1e-12)
    assert s.lr_factor == 8.0


def test_legw_keeps_warmup_iterations_constant_across_the_ladder():
    # LAMB Table 1: 1000k steps at 512 for a fixed number of epochs; warmup 1/320 of the run at 512.
    num_samples, epochs = 512 * 1_000_000, 1.0
    seen = {}
    for batch in [512 * 2**i for i in range(7)]:  # 512 ... 32768
        spe = steps_per_epoch(num_samples, batch)
        s = apply_scaling("legw", batch=batch, ref_batch=512, ref_lr=6.25e-4, ref_warmup_epochs=epochs / 320)
        seen[batch] = (epochs_to_steps(epochs, spe), epochs_to_steps(s.warmup_epochs, spe))
    assert seen[512] == (1_000_000, 3125)
    assert seen[32768] == (15625, 3125)  # warmup ratio 1/5 of the run, as in the paper
    assert {w for _, w in seen.values()} == {3125}
    # sqrt alone keeps warmup EPOCHS, so its iterations shrink with the batch: 3125 / 64 -> 49.
    s = apply_scaling("sqrt", batch=32768, ref_batch=512, ref_lr=6.25e-4, ref_warmup_epochs=epochs / 320)
    assert epochs_to_steps(s.warmup_epochs, steps_per_epoch(num_samples, 32768)) == 49


def test_legw_warmup_iterations_stay_within_rounding_on_an_uneven_dataset():
    num_samples = 1_234_567
    base = epochs_to_steps(0.01, steps_per_epoch(num_samples, 64))
    for batch in [64 * 2**i for i in range(7)]:
        s = apply_scaling("legw", batch=batch, ref_batch=64, ref_lr=1.0, ref_warmup_epochs=0.01)
        assert abs(epochs_to_steps(s.warmup_epochs, steps_per_epoch(num_samples, batch)) - base) <= 1


def test_unknown_rule_and_bad_batch_are_config_errors_listing_rules():
    with pytest.raises(ConfigError, match="none, linear, sqrt, legw"):
        apply_scaling("lars", batch=512, ref_batch=256, ref_lr=1.0, ref_warmup_epochs=0.0)
    with pytest.raises(ConfigError, match="none, linear, sqrt, legw"):
        apply_scaling("linear", batch=0, ref_batch=256, ref_lr=1.0, ref_warmup_epochs=0.0)


# ---------------------------------------------------------------- schedules

# 10 steps per epoch, 10 epochs, 1 warmup epoch; peak 1 so values read as multipliers.
RUN = dict(peak_lr=1.0, total_steps=100, warmup_steps=10, steps_per_epoch=10)


@pytest.mark.parametrize(
    "name, extra, last",
    [
        ("constant", {}, 1.0),
        ("linear", {}, 0.0),
        ("linear", {"end_lr": 0.1}, 0.1),
        ("poly", {"power": 2.0}, 0.0),
        ("cosine", {}, 0.0),
        ("exponential", {"gamma": 0.5}, 0.5**9),  # step 99 is in epoch 9
        ("step", {"gamma": 0.1, "milestones": [3, 6]}, 0.01),
    ],
)
def test_start_end_of_warmup_and_last_step(name, extra, last):
    lr = build_schedule(name, **RUN, **extra)
    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10 of the peak: the first step is not wasted
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)  # the 10th warmup step reaches the peak
    assert lr(99) == pytest.approx(last, abs=1e-12)


def test_smooth_decays_in_the_middle_of_the_decay():
    # progress = (s + 1 - W) / (T - W): 0.5 at s = 54, 1/90 at the first decay step s = 10.
    assert build_schedule("linear", **RUN)(10) == pytest.approx(1 - 1 / 90)
    assert build_schedule("linear", **RUN)(54) == pytest.approx(0.5)
    assert build_schedule("poly", **RUN, power=2.0)(54) == pytest.approx(0.25)
    assert build_schedule("cosine", **RUN)(54) == pytest.approx(0.5)
    assert build_schedule("cosine", **RUN, end_lr=0.2)(54) == pytest.approx(0.6)
    # "linear" is polynomial decay of power 1 whatever power says
    assert build_schedule("linear", **RUN, power=3.0)(54) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["linear", "poly", "cosine"])
def test_warmup_rises_and_decay_falls(name):
    lr = build_schedule(name, **RUN)
    values = [lr(s) for s in range(100)]
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    assert all(a > b for a, b in zip(values[9:99], values[10:100]))


def test_warmup_init_lr_and_no_warmup():
    assert build_schedule("constant", **{**RUN, "peak_lr": 2.0}, warmup_init_lr=1.0)(0) == pytest.approx(1.1)
    lr = build_schedule("linear", peak_lr=1.0, total_steps=100, warmup_steps=0, steps_per_epoch=10)
    assert lr(0) == pytest.approx(0.99)
    assert lr(99) == 0.0


def test_exponential_decays_once_per_epoch_after_decay_start():
    lr = build_schedule(
        "exponential",
        peak_lr=1.0,
        total_steps=40,
        warmup_steps=0,
        steps_per_epoch=4,
        gamma=0.5,
        decay_start_epoch=2,
    )
    assert [lr(s) for s in (0, 11)] == [1.0, 1.0]  # epochs 0-2 at the peak
    assert [lr(s) for s in (12, 15, 16, 39)] == [0.5, 0.5, 0.25, 0.5**7]
    # a fractional start must not miss a boundary to float noise: 1.1 - 0.1 epochs is one decay
    lr = build_schedule(
        "exponential",
        peak_lr=1.0,
        total_steps=40,
        warmup_steps=0,
        steps_per_epoch=10,
        gamma=0.5,
        decay_start_epoch=0.1,
    )
    assert (lr(10), lr(11)) == (1.0, 0.5)


def test_step_decay_counts_milestones_in_epochs():
    lr = build_schedule("step", **RUN, gamma=0.1, milestones=[3, 6.5])
    assert [lr(s) for s in (29, 30, 64, 65, 99)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_a_milestone_inside_warmup_gives_no_jump_when_warmup_ends():
    lr = build_schedule(
        "step", peak_lr=1.0, total_steps=100, warmup_steps=20, steps_per_epoch=10, milestones=[1]
    )
    assert lr(19) == pytest.approx(0.1)
    assert lr(20) == pytest.approx(0.1)


def test_steps_past_the_end_hold_the_last_lr_and_negative_steps_fail():
    lr = build_schedule("linear", **{**RUN, "warmup_steps": 0}, end_lr=0.1)
    assert lr(100) == lr(99) == pytest.approx(0.1)  # LambdaLR asks for one step past the end
    with pytest.raises(ValueError):
        lr(-1)


def test_warmup_longer_than_the_run_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"warmup \(12 steps = 1.2 epochs\) is longer than the run \(10 steps\)"
    ):
        build_schedule("linear", peak_lr=1.0, total_steps=10, warmup_steps=12, steps_per_epoch=10)
    # a warmup of exactly the run is allowed and ends on the peak
    assert (
        build_schedule("linear", peak_lr=1.0, total_steps=10, warmup_steps=10, steps_per_epoch=10)(9) == 1.0
    )


def test_unknown_schedule_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="constant, linear, poly, cosine, exponential, step"):
        build_schedule("onecycle", **RUN)
    with pytest.raises(ConfigError, match="gamma"):
        build_schedule("exponential", **RUN, gamma=0.0)
    with pytest.raises(ConfigError, match="steps"):
        build_schedule("constant", peak_lr=1.0, total_steps=0, warmup_steps=0, steps_per_epoch=1)


# ---------------------------------------------------------------- plot and package hygiene


def test_the_lr_plot_draws_each_run_against_samples_and_steps(tmp_path, monkeypatch):
    from largebatch.sched.plot import plot_planned_lr

    rows = []
    for batch in (512, 2048):
        s = apply_scaling("legw", batch=batch, ref_batch=512, ref_lr=1e-3, ref_warmup_epochs=0.05)
        spe = steps_per_epoch(512 * 200, batch)
        lr = build_schedule(
            "linear",
            peak_lr=s.lr,
            total_steps=spe,
            warmup_steps=epochs_to_steps(s.warmup_epochs, spe),
            steps_per_epoch=spe,
        )
        rows.append({"label": f"legw {batch}", "lrs": [lr(i) for i in range(spe)], "samples_per_step": batch})
    rows.append({"label": "no samples", "lrs": [1e-3] * 10})
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)  # keep the figure to read what was drawn
    out = plot_planned_lr(rows, tmp_path / "sub" / "lr.png")
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_samples, by_step = closed[0].axes
    # every row by step; by samples only the rows that say their samples, step s drawn at (s + 1) x batch
    assert [line.get_label() for line in by_step.lines] == ["legw 512", "legw 2048", "no samples"]
    assert [line.get_label() for line in by_samples.lines] == ["legw 512", "legw 2048"]
    for line, row in zip(by_samples.lines, rows):
        batch = row["samples_per_step"]
        assert list(line.get_xdata()) == [batch * (s + 1) for s in range(len(row["lrs"]))]
        assert list(line.get_ydata()) == row["lrs"]
    # the peaks follow the sqrt rule of LEGW: 1e-3 at 512, 2e-3 at 4x the batch
    assert max(rows[0]["lrs"]) == pytest.approx(1e-3) and max(rows[1]["lrs"]) == pytest.approx(2e-3)


def test_sched_imports_neither_hydra_nor_transformers_nor_matplotlib():
    code = (
        "import sys, largebatch.sched, largebatch.sched.plot; "
        "bad = {'hydra', 'transformers', 'matplotlib', 'torch'} & set(sys.modules); print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- configs


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from largebatch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=None, overrides=overrides)


@pytest.mark.parametrize("rule", RULES)
def test_scaling_configs_compose_and_take_their_reference_from_optimizer_and_schedule(rule):
    cfg = _compose([f"+scaling={rule}", "+schedule=linear", "+optimizer.lr=0.002"])
    assert cfg.scaling.rule == rule
    assert (cfg.scaling.ref_lr, cfg.scaling.ref_warmup_epochs) == (0.002, cfg.schedule.warmup_epochs)
    s = apply_scaling(
        rule,
        batch=4 * cfg.scaling.ref_batch,
        ref_batch=cfg.scaling.ref_batch,
        ref_lr=cfg.scaling.ref_lr,
        ref_warmup_epochs=cfg.scaling.ref_warmup_epochs,
    )
    assert s.k == 4.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_configs_compose_and_build(name):
    from omegaconf import OmegaConf

    cfg = _compose([f"+schedule={name}"])
    fields = OmegaConf.to_container(cfg.schedule)
    assert fields.pop("name") == name
    warmup_epochs = fields.pop("warmup_epochs")
    lr = build_schedule(
        name,
        peak_lr=1.0,
        total_steps=1000,
        steps_per_epoch=10,
        warmup_steps=epochs_to_steps(warmup_epochs, 10),
        **fields,
    )
    assert 0 < lr(0) <= 1.0
    assert math.isfinite(lr(999))


def test_every_schedule_and_rule_has_a_config_file():
    assert {p.stem for p in (CONF / "schedule").glob("*.yaml")} == set(SCHEDULES)
    assert {p.stem for p in (CONF / "scaling").glob("*.yaml")} == set(RULES)
