"""lb-report on fake-but-complete run folders: rows, tables, the generated verdict, plots, CLI, unigram."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from largebatch.report import RUN_COLUMNS, collect_runs, findings, main, unigram_baseline, write_report
from largebatch.report.summary import fmt
from largebatch.report.unigram import unigram_baseline_from_data

BUDGET = 1024  # samples every fake run sees, as a batch ladder at a fixed number of epochs would


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_run(root: Path, name: str, *, optimizer: str, stages: list[tuple[int, int, int]], eval_loss: float,
             seed: int = 0, finished: bool = True, downstream: tuple[float, float] | None = None,
             config: dict | None = None, status: dict | None = None) -> Path:
    """A run folder as `lb-train` writes it. ``stages``: (batch, seq_len, steps) per stage; ``config``: keys
    merged into its config.yaml; ``status``: its status.json (none: a run of a trainer that wrote none)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = {"batch": stages[-1][0], "seed": seed, "epochs": 1.0, "optimizer": {"name": optimizer, "lr": 1e-3},
           "scaling": {"rule": "sqrt", "ref_batch": 4}, "schedule": {"name": "linear"}, "model": {"size": "tiny"},
           "data": {"seq_len": stages[0][1], "sources": ["wiki"], "cache_dir": ".cache/largebatch"},
           "logger": {"name": "none", "mode": "offline"}, "progress": False,
           "stages": [] if len(stages) == 1 else [{"batch": b, "seq_len": s} for b, s, _ in stages]}
    cfg = _merge(cfg, config or {})
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / ".hydra" / "overrides.yaml").write_text(f"- optimizer={optimizer}\n- batch={stages[-1][0]}\n")
    env = {"command": f"lb-train -m optimizer={optimizer}", "cwd": str(root), "started": "2026-01-01T00:00:00",
           "versions": {"torch": "2.9.0"}, "git": {"sha": "abc123", "dirty": False}, "device": "cpu",
           "world_size": 1, "hardware": {"cpu": "Test CPU", "cpu_count": 2}}
    (run / "env.json").write_text(json.dumps(env))
    lr = 1e-3 * math.sqrt(stages[-1][0] / 4)
    plan = [{"name": f"stage{i}", "batch": b, "micro_batch": min(b, 16), "world_size": 1,
             "accumulation": max(1, b // 16), "seq_len": s, "train_samples": BUDGET, "epochs": 1.0,
             "steps_per_epoch": n, "total_steps": n, "lr": lr, "warmup_epochs": 0.1, "warmup_steps": 1,
             "scaling_rule": "sqrt", "k": b / 4} for i, (b, s, n) in enumerate(stages)]
    (run / "plan.json").write_text(json.dumps(plan))
    lines, step, samples = [], 0, 0
    for i, (b, _, n) in enumerate(stages):
        for k in range(n if finished else n // 2):
            step, samples = step + 1, samples + b
            lines.append({"step": step, "stage": f"stage{i}", "epoch": k / n, "samples": samples,
                          "loss": eval_loss + 1 - samples / BUDGET, "lr": lr * (1 - k / n), "grad_norm": 1.0,
                          "param_norm": 10.0, "update_norm": 0.1, "samples_per_s": 10.0 * b,
                          "tokens_per_s": 320.0 * b, "skipped_steps": 0})
        lines.append({"step": step, "stage": f"stage{i}", "samples": samples,
                      "eval/loss": eval_loss + (0.5 if i < len(stages) - 1 else 0.0), "eval/accuracy": 0.3,
                      "eval/tokens": 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if finished:
        summary = {"steps": step, "samples": samples, "skipped_steps": 0, "wall_time_s": step * 0.5,
                   "samples_per_s": samples / (step * 0.5), "world_size": 1, "optimizer": optimizer,
                   "batch": stages[-1][0], "final_loss": lines[-2]["loss"], "eval/loss": eval_loss,
                   "eval/accuracy": 0.3, "eval/tokens": 100}
        (run / "summary.json").write_text(json.dumps(summary))
    else:
        (run / "cli.log").write_text("[INFO] training\nlargebatch.errors.NonFiniteError: non-finite loss at step 3\n")
    if status is not None:
        (run / "status.json").write_text(json.dumps(status))
    if downstream:
        (run / "downstream.json").write_text(json.dumps({"task": "topics", "init": "pretrained",
                                                          "accuracy": downstream[0], "eval_loss": 1.0}))
        (run / "downstream_random.json").write_text(json.dumps({"task": "topics", "init": "random",
                                                                 "accuracy": downstream[1], "eval_loss": 2.0}))
    return run


def make_sweep(root: Path, *, lamb: tuple[float, ...] = (4.00, 4.01, 4.02),
               adamw: tuple[float, ...] = (4.00, 4.10, 4.40)) -> Path:
    """Two optimizers x three batches (4, 16, 64), one failed run, one two-stage LAMB run."""
    sweep = root / "sweep"
    n = 0
    for opt, losses in (("lamb", lamb), ("adamw", adamw)):
        for batch, loss in zip((4, 16, 64), losses):
            make_run(sweep, f"{n}_optimizer={opt},batch={batch}", optimizer=opt, stages=[(batch, 32, BUDGET // batch)],
                     eval_loss=loss, downstream=(0.8 - (loss - 4.0), 0.5))
            n += 1
    make_run(sweep, f"{n}_optimizer=lars,batch=64", optimizer="lars", stages=[(64, 32, 16)], eval_loss=4.5,
             finished=False)
    # 896 samples at batch 64 and length 32, then 128 at batch 16 and length 64: the same 1024 samples
    make_run(sweep, f"{n + 1}_optimizer=lamb,mixed", optimizer="lamb", stages=[(64, 32, 14), (16, 64, 8)],
             eval_loss=4.05)
    return sweep


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path)


def test_collect_runs_one_row_per_run_with_failed_and_mixed(sweep, tmp_path):
    rows = collect_runs([sweep])
    assert len(rows) == 8  # .hydra/config.yaml is not mistaken for a run
    assert [(r["optimizer"], r["batch_schedule"]) for r in rows][:4] == [
        ("lamb", "4"), ("lamb", "16"), ("lamb", "64"), ("lamb", "64@32/16@64")]
    assert [r["batch"] for r in rows][:4] == [4, 16, 64, 16]  # the int: the (last) stage's batch
    failed = [r for r in rows if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["optimizer"] == "lars" and failed[0]["eval_loss"] is None
    assert "last logged step 8 of 16" in failed[0]["note"] and "NonFiniteError" in failed[0]["note"]
    mixed = next(r for r in rows if r["stages"] == 2)
    assert mixed["batch"] == 16 and mixed["seq_len"] == 64 and mixed["samples"] == BUDGET
    assert mixed["peak_lr"] == f"{1e-3 * 2.0!r}/{1e-3 * 2.0!r}"
    top = next(r for r in rows if r["optimizer"] == "adamw" and r["batch"] == 64)
    assert top["eval_loss"] == 4.40 and top["base_lr"] == 1e-3 and top["peak_lr"] == pytest.approx(4e-3)
    assert top["downstream_accuracy"] == pytest.approx(0.4) and top["random_init_accuracy"] == 0.5
    # A run dir given directly, and a Hydra job that died before writing anything but .hydra/
    dead = tmp_path / "dead"
    (dead / ".hydra").mkdir(parents=True)
    (dead / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"batch": 8, "seed": 1, "optimizer":
                                                                      {"name": "lamb", "lr": 0.1},
                                                                      "data": {"seq_len": 16}, "stages": []}))
    rows = collect_runs([rows[0]["_dir"], dead])
    assert [(r["batch_schedule"], r["status"]) for r in rows] == [("4", "ok"), ("8", "incomplete")]
    assert "before its plan" in rows[1]["note"] and rows[1]["steps"] is None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The CLI run once over the fake sweep (plots are the slow part: draw them once per module)."""
    root = tmp_path_factory.mktemp("report")
    sweep = make_sweep(root)
    out = root / "results"
    unigram = {"loss": 6.25, "accuracy": 0.0625, "eval_tokens": 100, "seq_len": 32}
    files = write_report(collect_runs([sweep]), out, unigram=unigram, title="Toy ladder",
                         provenance={"report_command": "lb-report sweep"})
    assert set(files) == {"runs.csv", "table.md", "metric_vs_batch.png", "eval_loss_vs_samples.png",
                          "lr_schedules.png", "steps_to_target.png", "noise_scale.png", "provenance.json"}
    return out


def test_runs_csv_table_md_plots_and_provenance(report):
    out = report
    with open(out / "runs.csv") as f:
        reader = csv.DictReader(f)
        csv_rows = list(reader)
    assert reader.fieldnames == RUN_COLUMNS and len(csv_rows) == 8
    assert {r["status"] for r in csv_rows} == {"ok", "incomplete"}

    md = (out / "table.md").read_text()
    ours = md.split("## What this shows")[0]
    assert "| lamb | 4 | 1 | 256 | 1024 |" in ours and "| adamw | 64 | 1 | 16 | 1024 |" in ours
    assert "| 4.4000 |" in ours and "| lamb | 64@32/16@64 |" in ours
    assert "loss 6.2500, accuracy 0.0625" in md and "unigram frequency" in md
    paper = md.split("## The paper's numbers: [checked] from arXiv 1904.00962 v1 Table 1")[1]
    assert "| 32k | 15.6k | 91.460 | 1024 | 101.2 m |" in paper and "The paper's numbers, not ours" in paper
    assert "91.460" not in ours  # the paper's numbers stay in their own labelled table
    every = md.split("## Every run")[1]
    assert "| lars | 64 | 0 | incomplete |" in every and "2_optimizer=lamb,batch=64" in every
    for name in ("metric_vs_batch.png", "eval_loss_vs_samples.png", "lr_schedules.png", "steps_to_target.png",
                 "noise_scale.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["git_shas"] == ["abc123"] and prov["dirty_runs"] == 0
    assert prov["versions"][0]["versions"] == {"torch": "2.9.0"} and len(prov["runs"]) == 8
    assert prov["report_command"] == "lb-report sweep" and prov["unigram"]["loss"] == 6.25


def _verdict(tmp_path, **losses) -> str:
    return "\n".join(findings(collect_runs([make_sweep(tmp_path, **losses)]), tolerance=0.05))


def test_what_this_shows_follows_the_numbers(tmp_path):
    """One seed a cell: no interval, so no rung is shown to hold or fail and no verdict is "yes" (the band rule
    used to say "This shows the paper's effect" here)."""
    shows = _verdict(tmp_path / "a", lamb=(4.00, 4.01, 4.02), adamw=(4.00, 4.10, 4.40))
    assert "Verdict: unresolved" in shows and "Verdict: yes" not in shows and "paper's effect" not in shows
    assert "lamb: eval loss 4.0000 at batch 4 → 4.0200 at batch 64 (16x larger): change +0.02" in shows
    assert "1 run(s) did not finish" in shows and "same number of training samples (1024)" in shows
    assert "lamb against adamw, eval loss difference at each shared batch: 4: 4.0000 vs 4.0000 (one seed" in shows
    assert "evaluated at sequence length 64" in shows  # the mixed run's eval set differs


def test_seeds_are_averaged_with_their_spread(tmp_path):
    root = tmp_path / "seeds"
    for seed, loss in enumerate((4.0, 4.2, 4.4)):
        make_run(root, f"s{seed}", optimizer="adamw", stages=[(4, 32, 256)], eval_loss=loss, seed=seed)
    make_run(root, "top", optimizer="adamw", stages=[(64, 32, 16)], eval_loss=4.3)
    rows = collect_runs([root])
    write_report(rows, tmp_path / "out", paper_table=False)
    md = (tmp_path / "out" / "table.md").read_text()
    assert "| adamw | 4 | 3 | 256 | 1024 | 0.001 |" in md
    assert f"4.2000 ± {fmt(statistics.stdev([4.0, 4.2, 4.4]), 2)}" in md
    assert "[checked]" not in md
    text = "\n".join(findings(rows))
    assert "single seed" in text and "Cannot judge" in text  # one rung of adamw seeds, no lamb at all


def test_unigram_baseline_exact_on_a_toy_distribution():
    # train: id 1 twice, ids 2 and 3 once; id 0 is special. Add-one over the 3 non-special ids:
    # p(1) = 3/7, p(2) = p(3) = 2/7. Eval targets 1 and 2 (-100 = unmasked, dropped).
    got = unigram_baseline([[0, 1, 1, 2, 3, 0]], [[1, -100, 2, -100]], vocab_size=4, exclude_ids=[0])
    assert got["loss"] == pytest.approx(-(math.log(3 / 7) + math.log(2 / 7)) / 2, abs=1e-12)
    assert got["accuracy"] == 0.5 and got["eval_tokens"] == 2 and got["train_tokens"] == 4 and got["vocab"] == 3
    # an id never seen in training still costs a finite -ln(1/(N+V)); ties predict the smallest id
    unseen = unigram_baseline([2, 1], [3], vocab_size=4)
    assert unseen["loss"] == pytest.approx(math.log(6)) and unseen["accuracy"] == 0.0
    with pytest.raises(ValueError, match="special"):
        unigram_baseline([1, 2], [0], exclude_ids=[0])


class FakeTokenizer:
    all_special_ids = [0, 1]

    def __len__(self) -> int:
        return 8


def test_unigram_from_mlm_data_uses_the_eval_masks_and_skips_specials():
    data = SimpleNamespace(
        train=SimpleNamespace(sequences=torch.tensor([[0, 5, 5, 6, 1], [0, 5, 7, 7, 1]], dtype=torch.int32)),
        eval=[{"labels": torch.tensor([-100, 5, -100, 7, -100])}, {"labels": torch.tensor([-100, -100, 6, -100, -100])}],
        tokenizer=FakeTokenizer(),
    )
    got = unigram_baseline_from_data(data)
    # counts 5:3, 6:1, 7:2 over 6 non-special ids (2..7), N = 6: p = (c+1)/12
    assert got["loss"] == pytest.approx(-(math.log(4 / 12) + math.log(3 / 12) + math.log(2 / 12)) / 3)
    assert got["accuracy"] == pytest.approx(1 / 3)
    assert unigram_baseline_from_data(data, max_eval_samples=1)["eval_tokens"] == 2


def test_cli_writes_the_report_and_fails_cleanly_without_runs(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "sweep", "0_batch=4", optimizer="lamb", stages=[(4, 32, 256)], eval_loss=4.0)
    out = tmp_path / "results"
    assert main([str(run), "--out", str(out), "--title", "One run", "--no-paper"]) == 0
    md = (out / "table.md").read_text()
    assert md.startswith("# One run") and "[checked]" not in md
    assert f"1 run(s) (1 finished) -> {out}: " in capsys.readouterr().out
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["report_command"].startswith("lb-report ") and prov["inputs"] == [str(run)]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(empty), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no run folders") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "no such folder" in capsys.readouterr().err
    # No default results folder: a bare `lb-report RUNS` must not overwrite committed results.
    monkeypatch.chdir(empty)
    with pytest.raises(SystemExit) as exc:
        main([str(run)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_squad_f1_downstream_gets_its_own_columns(tmp_path):
    from largebatch.report.summary import group_cells
    from largebatch.report.write import render_table_md

    for batch, f1 in ((4, 61.5), (64, 58.25)):
        run = make_run(tmp_path, f"b{batch}", optimizer="lamb", stages=[(batch, 32, BUDGET // batch)], eval_loss=4.0)
        (run / "downstream.json").write_text(json.dumps({"task": "squad_v1.1", "init": "pretrained", "f1": f1}))
        (run / "downstream_random.json").write_text(json.dumps({"task": "squad_v1.1", "init": "random", "f1": 10.0}))
    rows = collect_runs([tmp_path])
    assert [r["downstream_f1"] for r in rows] == [61.5, 58.25] and rows[0]["downstream_accuracy"] is None
    bullets = findings(rows)
    md = render_table_md(rows, group_cells(rows), bullets, unigram=None, paper_table=False, title="t", notes=None,
                         provenance={})
    assert "| random-init acc | downstream F1 | random-init F1 |" in md and "| 61.5 | 10 |" in md
    assert "Downstream f1 (lamb): 61.5 at batch 4 → 58.25 at batch 64." in bullets
    assert any("helps downstream in 2 of 2 run(s)" in b for b in bullets)


def test_no_yes_for_a_candidate_that_barely_trained():
    """A barely-trained model keeps a flat loss at any batch: holding further up is then no evidence."""
    from types import SimpleNamespace as NS

    from largebatch.report.summary import _verdict

    holds = {"lamb": {"last": NS(batch=128), "possible": NS(batch=128)},
             "adamw": {"last": NS(batch=4), "possible": NS(batch=8)}}
    assert _verdict(holds, "lamb", "adamw").startswith("Verdict: yes")
    flat = _verdict(holds, "lamb", "adamw", barely={"lamb": 0.06})
    assert flat.startswith("Verdict: none") and "0.06 nats below the unigram" in flat and "yes" not in flat
    assert _verdict(holds, "lamb", "adamw", untrained={"lamb": 7.3}).startswith("Verdict: none")
