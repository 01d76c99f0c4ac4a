"""`make reproduce-table1 SCALE=smoke`: the whole pipeline (ladder, mixed batch, fine-tuning, report)
on a tiny config, writing outside results/."""

from __future__ import annotations

import csv
import importlib.util
import json

from conftest import REPO


def load_driver():
    spec = importlib.util.spec_from_file_location("reproduce_table1", REPO / "scripts" / "reproduce_table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_table_end_to_end(tmp_path):
    driver = load_driver()
    assert not driver.SCALES["smoke"]["results"].startswith("results/")  # never overwrites committed results
    results = driver.main(["--scale", "smoke", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    rows = list(csv.DictReader(open(results / "runs.csv")))
    by_opt = {(r["optimizer"], r["batch"]) for r in rows if r["status"] == "ok"}
    assert {("lamb", "8"), ("lamb", "32"), ("adamw", "8"), ("adamw", "32"), ("lars_paper", "8")} <= by_opt
    assert any("@" in r["batch"] for r in rows)  # the two-stage mixed-batch row
    assert len({r["samples"] for r in rows if "@" not in r["batch"]}) == 1  # every rung saw the same samples
    assert all(r["downstream_accuracy"] for r in rows)
    table = (results / "table.md").read_text()
    assert "[checked]" in table and "Unigram baseline" in table
    for name in ("metric_vs_batch.png", "eval_loss_vs_samples.png", "lr_schedules.png", "provenance.json"):
        assert (results / name).stat().st_size > 0
    record = json.loads((results / "reproduce.json").read_text())
    assert record["wall_time_s"] > 0 and record["command"].startswith("make reproduce-table1 SCALE=smoke")
