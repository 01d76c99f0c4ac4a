"""lb-plan's numbers for known configs, and the errors a user can make in the batch arithmetic."""

from __future__ import annotations

import json

import pytest

from largebatch.cli import plan_main
from largebatch.errors import ConfigError
from largebatch.plan import resolve_micro_batch


def run_plan(capsys, *args) -> list[dict]:
    plan_main(["--json", "scale=tiny", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_plan_numbers_for_a_known_config(capsys, data_cache):
    (row,) = run_plan(capsys, f"data.cache_dir={data_cache}", "data.train_samples=10000", "batch=256",
                      "micro_batch=32", "epochs=2", "schedule.warmup_epochs=0.5", "optimizer.lr=0.002")
    assert row["batch"] == 256 and row["micro_batch"] == 32 and row["accumulation"] == 8
    assert row["steps_per_epoch"] == 39 and row["total_steps"] == 78  # floor(10000/256) = 39
    assert row["warmup_steps"] == 20 and row["lr"] == pytest.approx(0.002)  # 0.5 x 39 = 19.5 -> 20


def test_plan_batch_ladder_one_row_per_batch(capsys):
    rows = run_plan(capsys, "data.train_samples=100000", "batch=512,1024,2048", "micro_batch=64")
    assert [r["batch"] for r in rows] == [512, 1024, 2048]
    assert [r["accumulation"] for r in rows] == [8, 16, 32]
    assert [r["steps_per_epoch"] for r in rows] == [195, 97, 48]


def test_plan_world_size_divides_the_batch(capsys):
    (row,) = run_plan(capsys, "--world-size", "4", "data.train_samples=10000", "batch=512", "micro_batch=32")
    assert row["accumulation"] == 4 and row["world_size"] == 4  # 512 = 32 x 4 ranks x 4


@pytest.mark.parametrize(("batch", "micro", "world", "accumulation"), [(64, 16, 1, 4), (64, 16, 2, 2), (8, 64, 1, 1)])
def test_accumulation_is_derived_from_the_global_batch(batch, micro, world, accumulation):
    used_micro, acc = resolve_micro_batch(batch, micro, world)
    assert used_micro * world * acc == batch and acc == accumulation


def test_batch_that_does_not_divide_names_the_numbers_and_a_fix(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["scale=tiny", "data.train_samples=10000", "batch=100", "micro_batch=16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "batch=100" in err and "micro_batch=16" in err and "world_size=1" in err
    assert "micro_batch=10" in err  # the largest divisor of 100 below 16


def test_batch_larger_than_training_set(capsys):
    with pytest.raises(SystemExit):
        plan_main(["scale=tiny", "data.train_samples=1000", "batch=2048", "micro_batch=64"])
    assert "larger than the training set" in capsys.readouterr().err


def test_warmup_longer_than_the_run(capsys):
    with pytest.raises(SystemExit):
        plan_main(["scale=tiny", "data.train_samples=1000", "batch=32", "epochs=1", "schedule.warmup_epochs=2"])
    assert "longer than the run" in capsys.readouterr().err


def test_uneven_world_size_is_refused():
    with pytest.raises(ConfigError, match="world_size=3"):
        resolve_micro_batch(64, 16, 3)


def test_plan_ladder_keeps_legw_warmup_iterations_and_plots(capsys, tmp_path):
    png = tmp_path / "lr.png"
    rows = run_plan(capsys, "data.train_samples=1310720", "epochs=8", "scaling=legw", "scaling.ref_batch=512",
                    "schedule.warmup_epochs=0.0625", "batch=512,2048,8192,32768", "--plot", str(png))
    assert [r["warmup_steps"] for r in rows] == [160] * 4  # warmup epochs x k, steps per epoch / k
    assert [r["lr"] / rows[0]["lr"] for r in rows] == pytest.approx([1, 2, 4, 8])  # sqrt(k)
    assert png.stat().st_size > 10_000
