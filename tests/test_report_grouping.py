"""lb-report pools as seeds only runs whose configs differ by the seed alone, and never pools a run whose
status.json says it failed, was interrupted or is still running (each is listed with its reason)."""

from __future__ import annotations

import csv

from test_report import BUDGET, make_run

from largebatch.report import collect_runs, findings, group_cells, write_report


def ladder_run(root, name, *, optimizer="adamw", batch=4, seed=0, loss=4.0, **kw):
    return make_run(root, name, optimizer=optimizer, stages=[(batch, 32, BUDGET // batch)], eval_loss=loss,
                    seed=seed, **kw)


def test_only_seeds_are_pooled_and_the_differing_keys_are_shown(tmp_path):
    root = tmp_path / "runs"
    # Seeds of one cell, even though they were run with different bookkeeping (progress bar, logger,
    # cache folder, resumed with periodic checkpoints).
    ladder_run(root, "a_s0", seed=0, loss=4.0)
    ladder_run(root, "a_s1", seed=1, loss=4.2, config={"progress": True, "logger": {"mode": "online"},
                                                       "data": {"cache_dir": "/scratch/cache"}, "resume": "auto",
                                                       "checkpoint_every_epochs": 0.1})
    # Not seeds: another learning rate, and other data, at the same optimizer and batch.
    ladder_run(root, "lr2", seed=0, loss=5.0, config={"optimizer": {"lr": 2e-3}})
    ladder_run(root, "bible", seed=1, loss=6.0, config={"data": {"sources": ["bible"]}})
    ladder_run(root, "a_top", batch=64, loss=4.1)  # the ladder's top rung of the first config
    rows = collect_runs([root])
    cells = group_cells(rows)
    by_run = {r["run"].rsplit("/", 1)[-1]: r for r in rows}
    assert by_run["a_s0"]["differs_in"] == by_run["a_s1"]["differs_in"] == by_run["a_top"]["differs_in"]
    assert "optimizer.lr=0.002" in by_run["lr2"]["differs_in"] and "data.sources=[bible]" in by_run["bible"]["differs_in"]
    assert "optimizer.lr=0.001" in by_run["a_s0"]["differs_in"]
    assert "data.sources=[wiki]" in by_run["a_s0"]["differs_in"] and "seed" not in by_run["a_s0"]["differs_in"]
    assert "progress" not in by_run["a_s1"]["differs_in"] and "logger" not in by_run["a_s1"]["differs_in"]

    at_4 = sorted((c for c in cells if c.batch == 4), key=lambda c: len(c.runs))
    assert [len(c.runs) for c in at_4] == [1, 1, 2]  # lr2, bible, and the two seeds
    pooled = at_4[-1]
    assert pooled.mean("eval_loss") == 4.1 and {r["seed"] for r in pooled.runs} == {0, 1}

    text = "\n".join(findings(rows))
    assert "adamw has finished single-stage runs in 3 configurations that differ in data.sources, optimizer.lr" in text
    # its ladder uses the configuration with two rungs: 4.1 (mean of two seeds) -> 4.1
    assert "adamw: eval loss 4.1000 ± 0.14 at batch 4 → 4.1000 at batch 64" in text

    write_report(rows, tmp_path / "out", paper_table=False)
    md = (tmp_path / "out" / "table.md").read_text()
    ours = md.split("## What this shows")[0]
    assert "| optimizer | batch | differs in | seeds |" in ours
    assert "| adamw | 4 | data.sources=[wiki], optimizer.lr=0.002 | 1 |" in ours
    assert "| adamw | 4 | data.sources=[bible], optimizer.lr=0.001 | 1 |" in ours
    assert "| adamw | 4 | data.sources=[wiki], optimizer.lr=0.001 | 2 |" in ours
    assert "'differs in': the config keys" in ours
    with open(tmp_path / "out" / "runs.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["batch"] for r in csv_rows} == {"4", "64"} and {r["batch_schedule"] for r in csv_rows} == {"4", "64"}
    assert "batch_size" not in csv_rows[0]


def test_candidate_and_baseline_on_other_data_is_flagged(tmp_path):
    root = tmp_path / "runs"
    for batch, loss in ((4, 4.0), (64, 4.01)):
        ladder_run(root, f"lamb{batch}", optimizer="lamb", batch=batch, loss=loss)
        ladder_run(root, f"adamw{batch}", optimizer="adamw", batch=batch, loss=loss + 0.3 * (batch > 4),
                   config={"data": {"max_documents": 100}, "optimizer": {"lr": 3e-4}})
    text = "\n".join(findings(collect_runs([root])))
    assert "The lamb and adamw ladders also differ in data.max_documents: the comparison" in text
    assert "optimizer.lr" not in text.split("ladders also differ in")[1].split(":")[0]


def test_failed_interrupted_and_running_runs_are_listed_with_their_reason_and_never_pooled(tmp_path):
    root = tmp_path / "runs"
    ladder_run(root, "ok", seed=0, loss=4.0, status={"status": "finished", "error": None, "step": 256})
    # Failed after its summary was written (the final checkpoint hit a full disk): still not pooled.
    ladder_run(root, "failed", seed=1, loss=9.0, status={"status": "failed", "step": 256,
                                                         "error": "OSError: [Errno 28] No space left on device"})
    ladder_run(root, "stopped", seed=2, loss=9.0, finished=False,
               status={"status": "interrupted", "error": "SIGTERM", "step": 128})
    ladder_run(root, "killed", seed=3, loss=9.0, finished=False, status={"status": "running", "error": None, "step": 0})
    ladder_run(root, "legacy", seed=4, loss=4.2)  # an older trainer: no status.json, summary.json = finished
    ladder_run(root, "claims", seed=5, loss=9.0, finished=False, status={"status": "finished", "step": 256})
    rows = {r["run"].rsplit("/", 1)[-1]: r for r in collect_runs([root])}
    assert {k: r["status"] for k, r in rows.items()} == {
        "ok": "ok", "legacy": "ok", "failed": "failed", "stopped": "interrupted", "killed": "running",
        "claims": "incomplete"}
    assert rows["failed"]["note"] == "failed at step 256 of 256: OSError: [Errno 28] No space left on device"
    assert rows["failed"]["eval_loss"] is None  # its numbers do not sit beside finished ones
    assert rows["stopped"]["note"] == "interrupted at step 128 of 256 (SIGTERM); continue it with resume=auto"
    assert rows["stopped"]["steps"] == 128
    assert rows["killed"]["note"].startswith("status.json says running (still running, or killed")
    assert rows["claims"]["note"] == "status.json says finished but summary.json is missing"

    cells = group_cells(list(rows.values()))
    assert len(cells) == 1 and sorted(r["seed"] for r in cells[0].runs) == [0, 4]
    text = "\n".join(findings(list(rows.values())))
    assert "4 run(s) did not finish" in text and "No space left on device" in text and "SIGTERM" in text

    write_report(list(rows.values()), tmp_path / "out", paper_table=False)
    md = (tmp_path / "out" / "table.md").read_text()
    assert "6 run folder(s): 2 finished, 1 failed, 1 interrupted, 1 running, 1 incomplete." in md
    every = md.split("## Every run")[1]
    assert "| adamw | 4 | 1 | failed | 256 |" in every and "No space left on device" in every
    assert "| adamw | 4 | 2 | interrupted | 128 |" in every
