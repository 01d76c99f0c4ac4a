"""The stop_at study (`reproduce_legw.py --steps-to-result`): its savings arithmetic, its report on synthetic run
folders, the jobs the driver builds, and at SCALE=smoke the stopped runs' steps to target against the full runs'."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_script
from largebatch import protocol as P
from largebatch.config import compose
from largebatch.report import ladder as L
from largebatch.report import steps_to_result as S
from largebatch.runfolder import read_metrics


@pytest.fixture(scope="module")
def driver():
    return load_script("scripts/reproduce_legw.py")


# ----------------------------------------------------------------------------- the arithmetic
def test_savings_are_the_steps_and_seconds_not_trained_as_a_fraction_of_the_full_budget():
    stopped = S.Saving(planned_steps=32, trained_steps=12, full_s=10.0, trained_s=4.0)
    assert (stopped.steps, stopped.steps_fraction) == (20, 0.625)
    assert (stopped.seconds, stopped.seconds_fraction) == (6.0, 0.6)
    assert stopped.steps_text() == "20 of 32 (62%)" and stopped.seconds_text() == "6.0 of 10.0 s (60%)"
    whole_budget = S.Saving(32, 32, full_s=10.0, trained_s=11.0)  # trained every step: the clocks' gap is noise
    assert (whole_budget.steps, whole_budget.seconds, whole_budget.seconds_fraction) == (0, 0.0, 0.0)
    untimed = S.Saving(16, 4)  # its full run has no wall time (it diverged): steps count, seconds do not
    assert untimed.seconds is None and untimed.seconds_text() == "—"
    total = S.total([stopped, whole_budget, untimed])
    assert (total.planned_steps, total.trained_steps, total.steps, total.steps_fraction) == (80, 48, 32, 0.4)
    assert (total.full_s, total.seconds, total.seconds_fraction) == (20.0, 6.0, 0.3)
    assert S.total([untimed]).seconds is None


@pytest.mark.parametrize("higher", [True, False])
def test_the_stop_value_makes_the_trainers_reaching_shallues_strictly_beating(higher):
    """The trainer stops at a value >= stop_at (<= for a loss); steps to result need one > target (<)."""
    target = 0.8125
    stop = S.stop_value(target, higher)
    reaches = (lambda v: v >= stop) if higher else (lambda v: v <= stop)
    beats = (lambda v: v > target) if higher else (lambda v: v < target)
    for v in (target, stop, math.nextafter(stop, math.inf), math.nextafter(stop, -math.inf), 0.5, 0.9):
        assert reaches(v) == beats(v), v
    assert compose([f"stop_at={stop!r}"]).stop_at == stop  # survives the override and its parse exactly


# ----------------------------------------------------------------------------- the report
def _run(folder: Path, *, steps: int, evals: list[float], wall_s: float, stop: dict | None = None) -> Path:
    """A finished run folder of ``steps`` planned steps at batch 8, evaluated every 4 steps with ``evals``."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 1\nbatch: 8\n")
    (folder / "plan.json").write_text(json.dumps([{"name": "main", "batch": 8, "seq_len": None, "lr": 0.1,
                                                   "warmup_epochs": 0.0, "total_steps": steps,
                                                   "steps_per_epoch": steps}]))
    curve = [{"step": 4 * i, "samples": 32 * i, "eval/m": v} for i, v in enumerate(evals, start=1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in curve))
    summary = {"steps": curve[-1]["step"], "samples": curve[-1]["samples"], "wall_time_s": wall_s}
    (folder / "summary.json").write_text(json.dumps({**summary, **({"stop_at": stop} if stop else {})}))
    (folder / "status.json").write_text(json.dumps({"status": "finished", "error": None, "step": summary["steps"]}))
    return folder


def test_the_report_sets_each_stopped_run_beside_its_full_run(tmp_path):
    """Target 0.75 (higher is better). Seed 1 beats it at step 12 of 16 and stops there; seed 2 never does and
    trains all 16; seed 3's stopped run claims step 8 where its full run first beats the target at 12 (the
    report must say so). Saved: 4 + 0 + 8 of 48 steps; 1.5 + 0 + 3.0 of 15 s."""
    full = [0.2, 0.5, 0.8, 0.9]
    entries = []
    for seed, (evals, full_evals, wall) in enumerate([(full[:3], full, 3.5), ([0.2, 0.5, 0.6, 0.7],) * 2 + (5.5,),
                                                      (full[:2], full, 2.0)], start=1):
        reached = evals[-1] > 0.75 or seed == 3
        stop = {"metric": "eval/m", "target": 0.75, "reached": reached,
                **({"step": 4 * len(evals), "samples": 32 * len(evals), "wall_time_s": wall - 0.5} if reached else {})}
        entries.append({"row": "legw", "batch": 8, "seed": seed,
                        "dir": _run(tmp_path / "stopped" / str(seed), steps=16, evals=evals, wall_s=wall, stop=stop),
                        "full": _run(tmp_path / "full" / str(seed), steps=16, evals=full_evals, wall_s=5.0)})
    out = S.write(entries, tmp_path, title="t", select_key="eval/m", target=0.75, higher_is_better=True,
                  names={"legw": "sqrt + LEGW"})
    assert [(r.step, r.full_step, r.agrees) for r in out["runs"]] == [(12, 12, True), (None, None, True),
                                                                     (8, 12, False)]
    assert (out["total"].steps, out["total"].planned_steps, out["total"].seconds) == (12, 48, 4.5)
    text = (tmp_path / "steps_to_result.md").read_text()
    assert "**Saved: 12 of 48 (25%) planned steps, 4.5 of 15.0 s (30%) of wall time**, over 3 runs; 2 of them" in text
    assert "1 of 3 runs did NOT stop where their full run first beats the target: sqrt + LEGW 8 seed 3 (8 against 12)" \
        in text
    assert "| sqrt + LEGW | 8 | 1 | 12 | 96 | 3 | 12 | 4 of 16 (25%) | 1.5 of 5.0 s (30%) |" in text
    assert "| sqrt + LEGW | 8 | 2 | never | — | — | never | 0 of 16 (0%) | 0.0 of 5.0 s (0%) |" in text
    record = json.loads((tmp_path / "steps_to_result.json").read_text())
    assert record["stop_at"] > 0.75 and record["total"]["steps_saved_fraction"] == 0.25
    assert [r["agrees"] for r in record["runs"]] == [True, True, False]


# ----------------------------------------------------------------------------- the driver
def test_the_study_runs_the_base_and_the_rules_rungs_again_stopped_at_the_target_in_their_own_folders(driver,
                                                                                                    tmp_path):
    scale = driver.SCALES["small"]
    full = driver.ladder_jobs("mnist_lstm", scale, tmp_path, 0.003, 0.25, 20.0)
    study = driver.steps_to_result_jobs("mnist_lstm", scale, tmp_path, 0.003, 0.25, 20.0, None, ["legw"], 0.8968)
    assert set(study) == {key for key in full if key[0] in ("base", "legw")}
    for key, job in study.items():
        assert job.run_dir == tmp_path / "steps_to_result" / full[key].run_dir.relative_to(tmp_path / "runs")
        assert job.overrides[:len(full[key].overrides)] == full[key].overrides  # the same run, stopped
        cfg = compose(job.overrides)
        assert cfg.stop_metric == "eval/accuracy" and cfg.stop_at == S.stop_value(0.8968, True) > 0.8968


@pytest.mark.system
def test_smoke_study_stops_each_run_where_its_full_run_reaches_the_target_then_resumes(driver, tmp_path):
    """MNIST-LSTM at SCALE=smoke (~1 min): every stopped run ends at its full run's steps to result (or trains its
    whole budget where the full run never gets there), with the same training and evaluation lines up to
    there; a second call trains nothing."""
    args = ["--scale", "smoke", "--task", "mnist_lstm", "--steps-to-result", "--out", str(tmp_path / "results"),
            "--work", str(tmp_path / "work")]
    (results,) = driver.main(args)
    record = json.loads((results / "steps_to_result.json").read_text())
    target = record["target"]
    assert record["metric"] == "eval/accuracy" and record["stop_at"] > target
    base = [{"row": "base", "batch": 16, "seed": int(d.name.split("seed=")[1]), "dir": d}
            for d in (results / "runs" / "base").glob("batch=*,seed=*")]
    spec = driver.task_spec("mnist_lstm", driver.SCALES["smoke"])
    assert target == L.step_targets(spec, L.load(base, spec.select_key, spec.report_key))[-1]  # table.md's strictest
    runs = record["runs"]
    assert {(r["row"], r["batch"], r["seed"]) for r in runs} == {("base", 16, 1), ("base", 16, 2), ("legw", 64, 1)}
    for r in runs:  # the records the results folder keeps of each stopped run and of its full run
        name = f"batch={r['batch']},seed={r['seed']}"
        stopped, full = results / "steps_to_result" / r["row"] / name, results / "runs" / r["row"] / name
        hit = P.steps_to_result(L.load([{**r, "dir": full}], "eval/accuracy", "eval/accuracy")[0].select, target, True)
        assert r["step"] == (hit and hit["step"]) and r["agrees"], r
        summary = json.loads((stopped / "summary.json").read_text())
        assert summary["steps"] == (r["step"] if r["reached"] else r["saving"]["planned_steps"])
        assert _lines(stopped) == _lines(full)[:len(_lines(stopped))]  # the same run, up to where it stopped
    # measured: base seed 1 beats the target at step 24 of 32, so the study stops a run before its budget's end
    assert record["total"]["steps_saved"] > 0
    assert "**Saved: " in (results / "steps_to_result.md").read_text()

    driver.main(args)
    steps = json.loads((results / "provenance.json").read_text())["steps"]
    assert {s["action"] for s in steps} == {"skip"} and any("/steps_to_result/" in s["run_dir"] for s in steps)
    assert json.loads((results / "steps_to_result.json").read_text())["runs"] == runs


def _lines(run_dir: Path) -> list[tuple]:
    """A run's training losses and validation accuracies by step (its timings left out)."""
    return [(m["step"], m.get("loss"), m.get("eval/accuracy")) for m in read_metrics(run_dir)
            if "loss" in m or "eval/accuracy" in m]
