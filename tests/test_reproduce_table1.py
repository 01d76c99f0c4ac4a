"""`make reproduce-table1 SCALE=smoke`: the whole pipeline (ladder, mixed batch, fine-tuning, report)
on a tiny config, writing outside results/; and run again, it skips finished runs and resumes the
unfinished one (the system tier: the driver end to end). The driver's pieces are tested on their own in
the fast tier."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import load_script
from largebatch.config import compose
from largebatch.errors import ConfigError


@pytest.fixture(scope="module")
def driver():
    return load_script("scripts/reproduce_table1.py")


@pytest.fixture(scope="module")
def smoke(driver, tmp_path_factory) -> Path:
    """One smoke reproduction (work and results folders under one temporary folder), shared by the tests."""
    root = tmp_path_factory.mktemp("smoke")
    driver.main(["--scale", "smoke", "--out", str(root / "results"), "--work", str(root / "work")])
    return root


@pytest.mark.system  # the driver end to end: ~3 min on 2 cores
def test_smoke_table_end_to_end(driver, smoke):
    assert not driver.SCALES["smoke"]["results"].startswith("results/")  # never overwrites committed results
    results = smoke / "results"
    rows = list(csv.DictReader(open(results / "runs.csv")))
    by_opt = {(r["optimizer"], r["batch"]) for r in rows if r["status"] == "ok"}
    assert {("lamb", "8"), ("lamb", "32"), ("adamw", "8"), ("adamw", "32"), ("lars_paper", "8")} <= by_opt
    assert any("@" in r["batch_schedule"] for r in rows)  # the two-stage mixed-batch row
    assert len({r["samples"] for r in rows if "@" not in r["batch_schedule"]}) == 1  # every rung: same samples
    assert all(r["downstream_accuracy"] for r in rows)
    table = (results / "table.md").read_text()
    assert "[checked]" in table and "Unigram baseline" in table
    for name in ("metric_vs_batch.png", "eval_loss_vs_samples.png", "lr_schedules.png", "provenance.json"):
        assert (results / name).stat().st_size > 0
    record = json.loads((results / "reproduce.json").read_text())
    assert record["wall_time_s"] > 0 and record["command"].startswith("make reproduce-table1 SCALE=smoke")
    assert record["calls"] == 1 and record["skipped_runs"] == record["resumed_runs"] == 0
    assert all(f"checkpoint_every_epochs={driver.CHECKPOINT_EVERY_EPOCHS}" in s["command"]
               for s in record["steps"] if s.get("run_dir"))
    for run in (smoke / "work" / "runs").glob("*/*"):
        assert json.loads((run / "status.json").read_text())["status"] == "finished"
        assert driver.run_action(run) == "skip"


@pytest.mark.system  # the driver end to end: ~3 min on 2 cores
def test_smoke_table_has_every_element_of_the_protocol(driver, smoke):
    """Validation selects and test reports; each base rung on fresh seeds; intervals and interval verdicts;
    a tuned row with its budget; steps to result for three targets; the McCandlish fit; B_simple by quarter;
    rows that do not beat the unigram dropped from the verdicts with the reason."""
    results = smoke / "results"
    rows = list(csv.DictReader(open(results / "runs.csv")))
    assert {(r["optimizer"], r["batch"], r["seed"]) for r in rows if r["batch"] == "8"} >= {
        ("lamb", "8", "1"), ("lamb", "8", "2")}  # the sweep's seed 0 never makes the target
    table = (results / "table.md").read_text()
    protocol = table.split("## The protocol's verdicts")[1].split("## Our runs")[0]
    for needle in ("Test loss (held-out documents apart from the validation ones", "[", "(target)",
                   "lamb (tuned) (3 trials per rung, halton:3, selected on validation)", "Steps to result",
                   "McCandlish fit", "| batch | Q1 | Q2 | Q3 | Q4 |", "unigram baseline on the test tokens"):
        assert needle in protocol, needle
    record = json.loads((results / "protocol.json").read_text())
    assert record["tuned"]["lamb"]["32"]["trials"] == 3 and record["spec"]["report_key"] == "test/loss"
    assert (results / "tuned" / "lamb" / "batch=32,seed=1" / "metrics.jsonl").is_file()
    summary = json.loads((results / "runs" / "lamb" / "batch=8,seed=1" / "summary.json").read_text())
    assert "test/loss" in summary and "eval/loss" in summary


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.system  # the driver end to end: ~3 min on 2 cores
def test_run_again_skips_finished_runs_and_resumes_the_killed_one(driver, smoke):
    """A SIGKILL after the run's second periodic checkpoint, made by hand: the newest checkpoint, the model,
    the summary and the fine-tune are gone and status.json still says running."""
    from largebatch.checkpoint import checkpoint_dirs

    work, results = smoke / "work", smoke / "results"
    killed = work / "runs" / "lamb" / "batch=8,seed=1"
    full = _lines(killed)
    summary = json.loads((killed / "summary.json").read_text())
    checkpoints = checkpoint_dirs(killed)
    assert len(checkpoints) == 2  # periodic ones (keep_checkpoints=2), the last one at the end of the run
    shutil.rmtree(checkpoints[-1])
    resume_step = int(checkpoints[0].name.split("_")[1])
    assert 0 < resume_step < summary["steps"]
    shutil.rmtree(killed / "model")
    for name in ("summary.json", "downstream.json"):
        (killed / name).unlink()
    (killed / "status.json").write_text(json.dumps({"status": "running", "error": None, "step": 0}))
    # A mark on a line before the checkpoint: a resumed run keeps those lines, a fresh start rewrites them.
    marked = [dict(m, marker=True) if m["step"] == 1 else m for m in full]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in marked))
    others = {p: p.stat().st_mtime_ns for p in (work / "runs").glob("*/*/downstream.json")}
    assert driver.run_action(killed) == "resume"

    driver.main(["--scale", "smoke", "--out", str(results), "--work", str(work)])

    record = json.loads((results / "reproduce.json").read_text())
    tuned = len(list((work / "tuned").glob("*/batch=*/trial,*"))) + len(list((work / "tuned").glob("*/batch=*,seed=*")))
    assert record["calls"] == 2 and record["resumed_runs"] == 1 and record["skipped_runs"] == len(others) + tuned
    resumed = next(s for s in record["steps"] if s.get("action") == "resume")
    assert resumed["run_dir"].endswith("lamb/batch=8,seed=1") and "resume=auto" in resumed["command"]
    lines = _lines(killed)
    assert lines[0].get("marker") is True  # continued from its checkpoint, not started over
    assert [m["step"] for m in lines] == [m["step"] for m in full]
    for got, want in zip(lines, full):
        for key in ("loss", "eval/loss", "lr"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    assert json.loads((killed / "status.json").read_text())["status"] == "finished"
    assert json.loads((killed / "summary.json").read_text())["eval/loss"] == pytest.approx(summary["eval/loss"],
                                                                                          rel=1e-5)
    # Only the resumed run was fine-tuned again; the report lists every run as finished.
    assert (killed / "downstream.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in others} == others
    rows = list(csv.DictReader(open(results / "runs.csv")))
    assert len(rows) == len(others) + 1 and {r["status"] for r in rows} == {"ok"}
    assert "over 2 calls of the driver" in (results / "table.md").read_text().splitlines()[0]


def _write_run(folder: Path, *, status: str | None = None, summary: bool = False, extra: tuple[str, ...] = ()):
    folder.mkdir(parents=True)
    if status is not None:
        (folder / "status.json").write_text(json.dumps({"status": status, "error": None, "step": 3}))
    if summary:
        (folder / "summary.json").write_text(json.dumps({"steps": 3, "eval/loss": 4.0}))
    for name in extra:
        (folder / name).write_text("x")
    return folder


def test_run_action_decides_per_run_folder(driver, tmp_path):
    action = driver.run_action
    assert action(tmp_path / "absent") == "start"
    (tmp_path / "empty").mkdir()
    assert action(tmp_path / "empty") == "start"
    assert action(_write_run(tmp_path / "finished", status="finished", summary=True)) == "skip"
    # status.json is the trainer's last word; without "finished" the run is continued
    for status in ("running", "failed", "interrupted"):
        assert action(_write_run(tmp_path / status, status=status, summary=True)) == "resume"
    assert action(_write_run(tmp_path / "no_summary", status="finished")) == "resume"
    assert action(_write_run(tmp_path / "torn", extra=("status.json",), summary=True)) == "resume"
    # an older trainer wrote no status.json and summary.json last
    assert action(_write_run(tmp_path / "legacy", summary=True)) == "skip"
    assert action(_write_run(tmp_path / "started", extra=("config.yaml", "metrics.jsonl"))) == "resume"


def test_a_finished_run_with_another_config_is_refused_not_skipped(driver, tmp_path, monkeypatch):
    base = ["experiment=lamb_table1", "progress=false", "scale=tiny", "optimizer=lamb", "batch=8",
            *driver.CHECKPOINT_OVERRIDES]
    run = _write_run(tmp_path / "runs" / "0_batch=8", status="finished", summary=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose([*base, "optimizer.lr=0.5"]), resolve=True))
    assert driver.config_changes(run, compose([*base, "optimizer.lr=0.5", "progress=true", "resume=auto"])) == []
    changes = driver.config_changes(run, compose(base))
    assert any(c.startswith("optimizer.lr: 0.5 in the run, ") for c in changes)
    assert {c.split(":")[0] for c in changes} <= {"optimizer.lr", "scaling.ref_lr"}  # ref_lr follows the lr

    monkeypatch.setattr(driver.drivers, "train", lambda cfg, run_dir: pytest.fail("must not train"))
    runner = driver.Runner(tmp_path)
    assert runner.train(["scale=tiny", "optimizer=lamb", "batch=8", "optimizer.lr=0.5"], run)["eval/loss"] == 4.0
    with pytest.raises(ConfigError, match=r"holds a run made with another config \(optimizer\.lr: 0\.5 in the run"):
        runner.train(["scale=tiny", "optimizer=lamb", "batch=8"], run)


def test_next_lr_walks_the_half_decade_grid(driver):
    assert [driver.next_lr(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-4)] == [3e-3, 1e-2, 3e-2, 1e-3]
    assert [driver.next_lr(x, up=False) for x in (1e-3, 3e-3, 1e-2, 3e-4)] == [3e-4, 1e-3, 3e-3, 1e-4]


def test_the_sweep_widens_past_an_edge_until_its_best_is_interior(driver, tmp_path, monkeypatch):
    """A loss whose minimum (lr 0.03 for lamb) lies above the grid: the grid grows upward until the best lr
    has a worse neighbour on both sides; a diverged run (inf) is never the best; adamw's grid already holds
    its minimum and is left alone; a loss falling forever stops at max_widen, recorded as not interior."""
    optimum = {"lamb": 3e-2, "adamw": 3e-4, "lars_paper": 1.0}
    ran = []

    def fake_run_many(self, jobs, in_process=False):
        out = []
        for job in jobs:
            opt = next(o.split("=")[1] for o in job.overrides if o.startswith("optimizer="))
            lr = float(next(o.split("=")[1] for o in job.overrides if o.startswith("optimizer.lr=")))
            ran.append((opt, lr))
            diverged = opt == "lamb" and lr >= 0.3
            out.append(None if diverged else {"eval/loss": 5 + abs(math.log10(lr / optimum[opt]))})
        return out

    monkeypatch.setattr(driver.Runner, "run_many", fake_run_many)
    scale = dict(driver.SCALES["small"], sweep=dict(fraction=0.25, max_widen=3, grid={
        "lamb": [1e-3, 3e-3, 1e-2], "adamw": [1e-4, 3e-4, 1e-3], "lars_paper": [1e-3, 3e-3, 1e-2]}))
    chosen, record = driver.sweep_base_lrs(driver.Runner(tmp_path), scale)
    assert chosen == {"lamb": 3e-2, "adamw": 3e-4, "lars_paper": 0.3}  # 3 widenings: 0.03, 0.1, 0.3
    assert list(record["lamb"]["eval_loss_by_lr"]) == ["0.001", "0.003", "0.01", "0.03", "0.1"]
    assert record["lamb"]["interior"] and record["adamw"]["interior"] and not record["lars_paper"]["interior"]
    assert len(ran) == len(set(ran))  # no run twice
    assert sorted(lr for opt, lr in ran if opt == "adamw") == [1e-4, 3e-4, 1e-3]


def test_the_pool_starts_the_runs_with_the_most_steps_first():
    from largebatch.drivers import job_cost

    costs = {b: job_cost(compose(["experiment=lamb_table1", f"batch={b}"])) for b in (2, 16, 128)}
    assert costs[2] == pytest.approx(8 * costs[16]) and costs[16] == pytest.approx(8 * costs[128])
    mixed = job_cost(compose(["experiment=lamb_mixed_batch"]))  # 0.9 of the epochs at 256, 0.1 at 128
    assert mixed == pytest.approx(compose(["experiment=lamb_table1"]).epochs * (0.9 / 256 + 0.1 / 128))
