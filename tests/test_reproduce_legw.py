"""`make reproduce-legw SCALE=smoke`: the LEGW driver end to end on a tiny workload, the scaling rules' arithmetic
on the driver's real configs and plans, and the report's computed sentences on synthetic run folders."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from conftest import load_script
from largebatch.config import compose
from largebatch.plan import build_plans
from largebatch.report import ladder as L
from largebatch.report.legw import write_legw_report
from largebatch.tasks import build_task


@pytest.fixture(scope="module")
def driver():
    return load_script("scripts/reproduce_legw.py")


# ----------------------------------------------------------------------------- the driver, end to end
@pytest.mark.system
def test_smoke_ladder_end_to_end_then_a_second_call_skips_every_run(driver, tmp_path):
    """The protocol end to end: selection on validation, a target from fresh seeds, interval verdicts, a tuned
    row with its budget, two epoch budgets, steps to result for three targets, the fit, B_simple by quarter."""
    assert not driver.SCALES["smoke"]["results"].startswith("results/")  # never overwrites committed results
    args = ["--scale", "smoke", "--task", "mnist_lstm", "--out", str(tmp_path / "results"),
            "--work", str(tmp_path / "work")]
    (results,) = driver.main(args)
    assert results == tmp_path / "results" / "mnist_lstm"
    rows = list(csv.DictReader(open(results / "runs.csv")))
    seeds = {(r["row"], r["batch"], r["seed"]) for r in rows if r["trial"] == "False"}
    assert seeds == {("base", "16", "1"), ("base", "16", "2"), *((rule, "64", "1") for rule in driver.RULES),
                     ("tuned", "64", "1")}  # the sweep's seed-0 run is never the target
    trials = [r for r in rows if r["trial"] == "True"]
    assert len(trials) == 3 and {r["seed"] for r in trials} == {"0"}
    assert {r["status"] for r in rows} == {"ok"}
    sweep = json.loads((results / "sweep.json").read_text())
    assert sweep["metric"] == "eval/accuracy"  # selection reads validation
    base_lr, warmup = sweep["lr"]["chosen"], sweep["warmup_epochs"]["chosen"]
    lr = {r["row"]: float(r["peak_lr"]) for r in rows if r["trial"] == "False"}
    assert lr["base"] == pytest.approx(base_lr) and lr["none"] == pytest.approx(base_lr)
    assert lr["legw"] == lr["sqrt"] == pytest.approx(2 * base_lr) and lr["linear"] == pytest.approx(4 * base_lr)
    linear = next(r for r in rows if r["row"] == "linear")
    assert float(linear["warmup_epochs"]) == pytest.approx(max(warmup, 1 / 18))  # Goyal's 5/90 of the run
    chosen = sweep["tuned"]["64"]["chosen"]
    assert lr["tuned"] == pytest.approx(chosen["lr"]) and sweep["tuned"]["64"]["trials"] == 3
    table = (results / "table.md").read_text()
    base = [float(r["report"]) for r in rows if r["row"] == "base"]
    assert f"Target: test/accuracy {sum(base) / 2:.4g} [" in table and "from 2 seed(s) the sweep never ran" in table
    for needle in ("### test/accuracy at 0.5 epochs", "### test/accuracy at each run's end", "(target)",
                   "tuned (oracle) (3 trials per rung, halton:3, selected on validation)", "Steps to result",
                   "McCandlish fit", "| batch | Q1 | Q2 | Q3 | Q4 |", "majority class"):
        assert needle in table, needle
    assert any(word in table for word in ("✓", "✗", "unresolved, needs"))
    for name in ("metric_vs_batch.png", "steps_to_target.png", "provenance.json"):
        assert (results / name).stat().st_size > 0
    assert (results / "runs" / "tuned" / "batch=64,seed=1" / "metrics.jsonl").is_file()
    assert json.loads((results / "provenance.json").read_text())["protocol"] == "v2"

    first = json.loads((tmp_path / "work" / "mnist_lstm" / "driver_time.json").read_text())
    # A second call, with a second task, the two together on two workers: mnist_lstm's runs are all finished,
    # so it only renders its table again (no call, no time, nothing shared); ptb trains beside a task that
    # trained nothing, so it shared its workers with none.
    driver.main([*args, "--task", "ptb", "--jobs", "2"])
    record = json.loads((results / "provenance.json").read_text())
    assert record["steps"] and {s["action"] for s in record["steps"]} == {"skip"}
    assert record["calls"] == first["calls"] == 1 and record["wall_time_s"] == first["seconds"]
    assert " calls " not in (results / "table.md").read_text().splitlines()[0]
    assert record["run_together_with"] == []
    ptb = json.loads((tmp_path / "results" / "ptb" / "provenance.json").read_text())
    assert "start" in {s["action"] for s in ptb["steps"]} and ptb["run_together_with"] == []


# ----------------------------------------------------------------------------- the rules' arithmetic
FACTORS = {"legw": (math.sqrt, lambda k: k), "sqrt": (math.sqrt, lambda k: 1.0),
           "linear": (lambda k: k, lambda k: 1.0), "none": (lambda k: 1.0, lambda k: 1.0)}


@pytest.mark.parametrize("task", ["mnist_lstm", "ptb"])
def test_each_rule_scales_lr_and_warmup_per_rung_in_the_real_plans(driver, task):
    """From the configs the driver composes: lr x sqrt k and warmup epochs x k (so constant warmup STEPS)
    for legw, lr x sqrt k for sqrt, lr x k for linear, nothing for none; k = batch / base batch. Every rule
    is the identity at the base rung (checked once: its config differs between rules only in the rule)."""
    scale = driver.SCALES["smoke"]
    base, top = scale["tasks"][task]["ladder"]
    base_lr, warmup, k = 0.002, 0.05, top / base
    data = None

    def plan(rule, batch):
        nonlocal data
        cfg = compose(["progress=false", *driver.run_overrides(task, scale, rule, batch, base_lr, warmup, 0)])
        data = data or build_task(cfg)  # the data is the same for every rule and rung: load it once
        (stage,) = build_plans(cfg, data, 1)
        return stage

    at_base = plan("legw", base)
    assert (at_base.k, at_base.lr, at_base.warmup_epochs) == (1.0, pytest.approx(base_lr), pytest.approx(warmup))
    for rule, (lr_factor, warmup_factor) in FACTORS.items():
        at_top = plan(rule, top)
        assert at_top.k == pytest.approx(k)
        assert at_top.lr == pytest.approx(base_lr * lr_factor(k)), rule
        assert at_top.warmup_epochs == pytest.approx(warmup * warmup_factor(k)), rule
        if rule == "legw":
            assert at_top.warmup_steps == pytest.approx(at_base.warmup_steps, abs=1)  # constant steps
        else:
            assert at_top.warmup_steps < at_base.warmup_steps  # the same epochs are fewer steps at a larger batch


def test_with_no_base_warmup_legw_is_sqrt_and_its_runs_are_sqrts(driver, tmp_path):
    """k x 0 epochs of warmup is none: the legw rungs are the sqrt runs (one folder, trained once)."""
    scale = driver.SCALES["small"]
    none_ = driver.ladder_jobs("ptb", scale, tmp_path, 1.0, 0.0, 1.0, seeds=2)
    assert all(none_["legw", b, s].run_dir == none_["sqrt", b, s].run_dir
               and "scaling=sqrt" in none_["legw", b, s].overrides for (rule, b, s) in none_ if rule == "legw")
    some = driver.ladder_jobs("ptb", scale, tmp_path, 1.0, 0.0078125, 1.0, seeds=2)
    assert len({job.run_dir for job in some.values()}) == len(some)  # with a warmup every rule runs its own
    assert len({job.run_dir for job in none_.values()}) == len(none_) - 8  # 4 rungs x 2 seeds
    assert {s for (row, _, s) in some if row == "base"} == {1, 2}  # fresh seeds: the sweep ran seed 0


def test_every_scale_ladder_has_its_papers_span(driver):
    """64x for the LSTMs, 16x for seq2seq, >= 32x for the ResNet; >= 5 rungs beyond smoke; the base warmup
    grid never exceeds what LEGW can scale to the top rung within the run."""
    span = {"ptb": 64, "mnist_lstm": 64, "seq2seq": 16, "resnet": 32}
    for name in ("small", "gpu"):
        for task, spec in driver.SCALES[name]["tasks"].items():
            ladder = spec["ladder"]
            assert ladder[-1] / ladder[0] >= span[task] and len(ladder) >= 4, (name, task)
            epochs = next((float(o.split("=")[1]) for o in spec["train"] if o.startswith("epochs=")), None)
            epochs = epochs or compose([*driver.TASKS[task]["base"], *spec["train"]]).epochs  # the workload's
            assert max(spec["warmup_grid"]) * ladder[-1] / ladder[0] <= epochs, (name, task)


def test_warmup_grid_widens_by_doubling_within_the_limit_and_stops_at_zero(driver):
    step = driver.warmup_step(0.5)
    assert step(0.1, True) == 0.2 and step(0.4, True) == 0.5 and step(0.5, True) is None
    assert step(0.0, True) == 0.125 and step(0.0, False) is None and step(0.2, False) == 0.1
    assert step(0.01, False) == 0.0  # below limit / 64: straight to no warmup


# ----------------------------------------------------------------------------- the report's sentences
def _fake_run(folder: Path, *, batch: int, seed: int, final: float, higher: bool, lr: float = 0.1,
              warmup: float = 0.1, samples: int = 1024) -> Path:
    """A finished run folder: a config, a plan, validation and test curves moving linearly to ``final``
    (validation) and ``final`` less 0.001 (test)."""
    folder.mkdir(parents=True)
    steps = samples // batch
    (folder / "config.yaml").write_text(f"seed: {seed}\nbatch: {batch}\n")
    (folder / "plan.json").write_text(json.dumps([{"name": "main", "batch": batch, "seq_len": None, "lr": lr,
                                                   "warmup_epochs": warmup, "warmup_steps": 4, "total_steps": steps,
                                                   "steps_per_epoch": steps}]))
    start = 0.0 if higher else 2 * final
    curve = [{"step": steps * i // 4, "samples": samples * i // 4, "eval/m": start + (final - start) * i / 4,
              "test/m": start + (final - start) * i / 4 - 0.001} for i in range(1, 5)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in curve))
    (folder / "summary.json").write_text(json.dumps({"steps": steps, "samples": samples, "wall_time_s": steps * 0.5}))
    (folder / "status.json").write_text(json.dumps({"status": "finished", "error": None, "step": steps}))
    return folder


def _ladder(root: Path, finals: dict, higher: bool = True) -> list[dict]:
    """Run folders for {(row, batch): [final per seed]}; the base's seeds start at 1 (fresh seeds)."""
    return [{"row": row, "batch": batch, "seed": seed, "dir": _fake_run(
        root / row / f"batch={batch},seed={seed}", batch=batch, seed=seed, final=final, higher=higher)}
        for (row, batch), values in finals.items() for seed, final in enumerate(values, start=1)]


def _spec(higher: bool, **kwargs) -> L.Spec:
    return L.Spec("eval/m", "test/m", higher, margin=0.01, **kwargs)


def test_each_rung_holds_fails_or_is_unresolved_by_its_own_interval(tmp_path):
    """Accuracy, margin 1% of ~0.90: legw's two tight seeds hold at 256; linear's fail; sqrt's seeds (0.80, 0.95)
    straddle the margin: unresolved, with the seeds that would resolve it. No verdict borrows another rung."""
    finals = {("base", 32): [0.900, 0.901, 0.899], ("legw", 128): [0.9005, 0.9], ("legw", 256): [0.899, 0.9],
              ("linear", 128): [0.85, 0.851], ("linear", 256): [0.70, 0.72],
              ("sqrt", 128): [0.9, 0.899], ("sqrt", 256): [0.80, 0.95]}
    out = write_legw_report(_ladder(tmp_path / "runs", finals), tmp_path / "report", task="t",
                            spec=_spec(True, baseline=0.1, baseline_name="majority class"))
    assert out["reach"] == {"legw": (256, 256), "sqrt": (128, 256), "linear": (32, 32)}
    text = "\n".join(out["statements"])
    assert "**sqrt + LEGW** holds at every rung, to batch 256 (8x)" in text
    assert "**linear (Goyal)** fails at the first rung above the base" in text
    assert "**sqrt (no LEGW)** holds to batch 128 (4x); unresolved up to 256 (8x)" in text
    assert "no other rule is shown to fail" not in text and "where linear (Goyal) fail(s) before the top" in text
    assert "The base beats the majority class" in text
    table = (tmp_path / "report" / "table.md").read_text()
    assert "0.709 [" in table and " ✗" in table and "? unresolved, needs" in table
    rows = {(r["row"], r["batch"], r["seed"]): r for r in csv.DictReader(open(tmp_path / "report" / "runs.csv"))}
    assert float(rows["linear", "256", "1"]["report"]) == pytest.approx(0.699)  # test, not validation


def test_a_lower_is_better_metric_and_an_untrained_base(tmp_path):
    finals = {("base", 20): [100.4, 100.6, 100.5], ("legw", 80): [100.4, 100.6], ("sqrt", 80): [130.0, 131.0]}
    out = write_legw_report(_ladder(tmp_path / "runs", finals, higher=False), tmp_path / "report", task="ptb",
                            spec=_spec(False, baseline=90.0, baseline_name="unigram"))
    assert out["reach"]["sqrt"] == (20, 20) and out["reach"]["legw"] == (80, 80)
    text = "\n".join(out["statements"])
    assert "The base does NOT beat the unigram (90): no verdict of this table means anything." in text
    # steps to result: the base's validation curve falls from 200 to 100 over 4 evals; the strictest target
    # (the base's final mean, 100.5) is first strictly beaten at its last eval (step 51)
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| 20 | 51 / 51 / 51 |" in table
    # the strictest target 100.5 is first beaten at the base's last eval (epoch 1); legw at 80 ends at 100.4-100.6
    assert "Epochs to the validation target 100.5: 1 at the base batch; sqrt + LEGW at 80: 1; sqrt (no LEGW) at 80: never" \
        in "\n".join(out["statements"])


# ----------------------------------------------------------------------------- the committed tables
def _committed():
    from conftest import REPO

    return sorted(p.parent for p in (REPO / "results" / "legw").glob("*/provenance.json")
                  if "task" in json.loads(p.read_text()))  # a ladder's table (not the warmup ablation's)


@pytest.mark.parametrize("folder", _committed(), ids=lambda p: p.name)
def test_a_committed_table_is_what_its_run_records_give(driver, folder, tmp_path):
    """results/legw/<task>/table.md is the report of the run records committed beside it, not edited by hand:
    rendered again from runs/<row>/batch=B,seed=S/ by the driver, it is the same."""
    import shutil

    record = json.loads((folder / "provenance.json").read_text())
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "table.md").write_text((folder / "table.md").read_text().splitlines()[0] + "\n")  # the title alone
    (copy / "runs.csv").unlink()
    driver.rerender(record["task"], copy)
    assert (copy / "table.md").read_text() == (folder / "table.md").read_text()
    assert (copy / "runs.csv").read_text() == (folder / "runs.csv").read_text()
