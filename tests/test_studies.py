"""The two CPU studies' readings (scripts/legw_warmup_ablation.py, scripts/lamb_studies.py) on run folders
written here: which rule or optimizer the intervals favour, and what a diverged seed does to a cell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import lamb_studies as S  # noqa: E402
import legw_warmup_ablation as A  # noqa: E402


def fake_run(run_dir: Path, lines: list[dict], diverged: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if diverged:
        (run_dir / "status.json").write_text(json.dumps({"status": "failed", "error": "NonFiniteError: loss nan"}))
        return
    (run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": 1.0}))


def accuracy_run(run_dir: Path, acc: float) -> None:
    # 4 evaluations, the last 3 averaged: a first one far off must not count
    fake_run(run_dir, [{"step": i, "eval/accuracy": acc if i else 0.1, "test/accuracy": acc if i else 0.1}
                       for i in range(4)])


def test_the_ablation_reads_legw_better_at_64x_no_difference_at_16x_and_counts_a_diverged_seed(tmp_path):
    jobs = A.arm_jobs("adam", 0.01, tmp_path)
    for (row, batch, seed), job in jobs.items():
        if row == "base":
            accuracy_run(job.run_dir, 0.880 + 0.001 * seed)
        elif batch == 8192 and row == "legw":
            accuracy_run(job.run_dir, 0.860 + 0.002 * seed)
        elif batch == 8192 and row == "sqrt":
            if seed == 3:
                fake_run(job.run_dir, [{"step": 0, "loss": float("nan")}], diverged=True)
            else:
                accuracy_run(job.run_dir, 0.800 + 0.002 * seed)
        else:  # 2048: both rules alike, within a seed's noise
            accuracy_run(job.run_dir, 0.875 + 0.004 * seed)
    arms = {"adam": dict(A.ARMS["adam"], lr=0.01, jobs=jobs, spe={128: 384, 2048: 24, 8192: 6})}
    text = A.render(arms, tmp_path / "out", 60.0)
    head = text.split("## adam")[0]
    assert "**adam, batch 8192**: LEGW's warmup is better than sqrt alone by 0.0" in head
    assert "**adam, batch 2048**: no difference resolved" in head
    assert "1 diverged" in text  # the diverged seed is counted beside its cell, not averaged
    gap = arms["adam"]["gaps"][8192]
    assert 0.05 < gap.gap < 0.07 and gap.lo > 0  # legw 0.864 vs sqrt 0.803
    assert "| 8192 | 64 | 0.08 |" in text  # sqrt's lr at 64x: 0.01 x 8
    # LEGW warms up for k x 36 = 2304 base steps' worth of epochs; sqrt for the base's 0.09375 epochs
    assert "36.0 steps" in text and "0.6 steps" in text


def test_lr_robustness_finds_the_multipliers_within_the_margin_of_each_optimizers_best(tmp_path):
    jobs = S.lr_jobs(tmp_path, {"lamb": 3e-3, "adamw": 3e-4})
    for (opt, m, seed), job in jobs.items():
        # LAMB flat to 4x then 0.3 nats worse; AdamW best at 1x and 0.2 nats worse from 2x, diverged at 8x
        if opt == "lamb":
            loss = 6.50 + (0.3 if m == 8 else 0.0) + 0.002 * seed
        else:
            loss = 6.60 + (0.0 if m <= 1 else 0.2) + 0.002 * seed
        if opt == "adamw" and m == 8:
            fake_run(job.run_dir, [{"step": 0, "loss": float("nan")}], diverged=True)
        else:
            fake_run(job.run_dir, [{"step": 1, "eval/loss": loss, "test/loss": 9.0}, {"step": 2, "eval/loss": loss,
                                                                                      "test/loss": loss}])
    heads, table, record = S.lr_section(jobs, floor=6.75)  # AdamW from 2x is above this "unigram"
    assert record["lamb"]["holds"] == [0.5, 1, 2, 4]
    assert record["adamw"]["holds"] == [0.5, 1]
    assert 8 not in record["adamw"]["not_failing"]  # every seed diverged: missing counts as failing
    assert record["lamb"]["trains_at"] == [0.5, 1, 2, 4] and record["adamw"]["trains_at"] == [0.5, 1]
    assert "LAMB tolerates larger learning rates than AdamW" in heads[-1] and "4x for LAMB, 1x for AdamW" in heads[-1]
    assert any("⚠ not below the unigram" in row for row in table)
    assert any("2 of 2 not finite or not run" in row for row in table)
