"""MLPerf's reference convergence points: the bundled numbers against verbatim copies of their source, the
checker's statistics, the verdicts, and lb-report's comparison on synthetic run folders."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from largebatch.protocol import t_cdf
from largebatch.report import main, mlperf, rcp
from largebatch.report.runs import collect_runs

SOURCE = Path(__file__).parent / "data" / "mlperf_rcp"  # verbatim copies; SOURCE.md cites them
COPIES = {"resnet": ("training_4.0.0_rcps_resnet.json", "training_4.0.0_closed_resnet.yaml"),
          "bert": ("training_5.1.0_rcps_bert.json", "training_5.1.0_closed_bert.yaml")}
IMAGENET = mlperf.IMAGENET_TRAIN


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, rcp.Benchmark]:
    return rcp.load_benchmarks()


def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------- the bundled numbers against their source


@pytest.mark.parametrize("name", sorted(COPIES))
def test_bundled_rcps_are_the_source_files(name):
    bundled = json.loads(rcp.REFERENCE_FILE.read_text())
    entry = bundled["benchmarks"][name]
    rcps_copy, target_copy = (SOURCE / f for f in COPIES[name])
    # the copies are the files the bundle cites (git's own object ids at the cited commit)
    assert git_blob(rcps_copy) == entry["blob"]
    assert git_blob(target_copy) == entry["target_blob"]
    assert entry["path"].endswith(rcps_copy.name.split("_", 2)[-1]) and entry["mlperf_version"].split()[-1] in rcps_copy.name
    assert bundled["source"]["commit"] in (SOURCE / "SOURCE.md").read_text()
    source = json.loads(rcps_copy.read_text())
    assert len(entry["rcps"]) == len(source)
    for point in entry["rcps"]:
        theirs = source[point["name"]]
        assert theirs["Benchmark"] == name
        assert point["batch"] == theirs["BS"]
        assert (point["creator"], point["when"], point["platform"]) == (theirs["Creator"], theirs["When"], theirs["Platform"])
        assert point["hyperparameters"] == theirs["Hyperparams"]
        assert point["runs"] == theirs["Epochs to converge"]
    # the target: the compliance checker's eval_accuracy threshold
    threshold = re.search(r"v\['value'\] >= ([0-9.]+)", target_copy.read_text()).group(1)
    assert entry["target"] == float(threshold)


def test_targets_and_units_as_the_issue_states(benchmarks):
    assert (benchmarks["resnet"].target, benchmarks["resnet"].unit) == (0.759, "epochs")
    assert (benchmarks["bert"].target, benchmarks["bert"].unit) == (0.72, "samples")
    assert benchmarks["resnet"].info["epoch_samples"] == IMAGENET


def test_reference_file_ships_inside_the_package():
    # the wheel packages everything under largebatch/ (pyproject: packages = ["largebatch"])
    package = Path(rcp.__file__).resolve().parents[1]
    assert package.name == "largebatch" and rcp.REFERENCE_FILE.resolve().is_relative_to(package)


# ---------------------------------------------------------------------- the checker's statistics

# Computed by running mlperf_logging/rcp_checker/rcp_checker.py (the cited commit, numpy + scipy 1.17.1) on the
# copies above: RCP_Checker(...).pruned_rcp_data, its "RCP Mean", "RCP Stdev" and "Min Epochs", and
# _create_interp_rcp between the kept neighbours.
CHECKER = {
    "resnet": {"kept": [1632, 3264, 32768, 49152, 67840],
               "measured": {3264: (35.1538, 0.7483, 34.3096), 4096: (39.875, 1.0, 38.634), 67840: (85.8462, 0.6389, 85.1826)},
               "interpolated": {4096: (35.7417, 0.7398, 34.8671), 34560: (57.3125, 0.4675, 56.7598),
                                8192: (38.6357, 0.698, 37.8105)}},
    "bert": {"kept": [448, 4608, 6144, 6912, 12288, 13056, 16384],
             "measured": {256: (2549219.5556, 218406.1341, 2390441.552), 448: (2414421.3333, 197392.4765, 2274732.029),
                          16384: (5505422.2222, 144642.7095, 5400269.1287)},
             "interpolated": {4096: (2750860.4718, 139139.554, 2651582.8462), 512: (2420323.7744, 196370.4954, 2280211.233),
                              8192: (3807431.1111, 113881.1743, 3726175.6216)}},
}


@pytest.mark.parametrize("name", sorted(CHECKER))
def test_statistics_reproduce_the_mlperf_checker(benchmarks, name):
    bench, expected = benchmarks[name], CHECKER[name]
    assert [p.batch for p in bench.kept()] == expected["kept"]
    by_batch = {p.batch: p for p in bench.points}
    for batch, (mean, std, bound) in expected["measured"].items():
        p = by_batch[batch]
        assert p.mean == pytest.approx(mean, rel=1e-5) and p.std == pytest.approx(std, rel=1e-4)
        assert bench.mlperf_lower_bound(p) == pytest.approx(bound, rel=1e-5)  # the checker bisects to 1e-4
    for batch, (mean, std, bound) in expected["interpolated"].items():
        p, where = bench.reference_at(batch)
        assert where == "interpolated" and p.n == 2 * bench.submission_runs
        assert (p.mean, p.std) == (pytest.approx(mean, rel=1e-5), pytest.approx(std, rel=1e-4))
        assert bench.mlperf_lower_bound(p) == pytest.approx(bound, rel=1e-5)


def test_lower_bound_is_where_the_one_sided_t_test_starts_to_reject():
    """MLPerf bisects on the p-value of ttest_ind_from_stats(equal_var=True) made one-sided; the closed form
    must land on the same boundary."""
    point = rcp.Point(3264, 35.0, 0.8, 13)
    for n_runs in (1, 3, 8):
        bound = rcp.lower_bound(point, n_runs)
        t = (bound - point.mean) / (point.std * math.sqrt(1 / point.n + 1 / n_runs))
        assert t_cdf(t, point.n + n_runs - 2) == pytest.approx(rcp.ALPHA, abs=1e-9)
    assert rcp.lower_bound(rcp.Point(1, 10.0, 0.0, 5), 1) == 10.0  # no spread: only the mean itself


def test_olympic_mean_and_population_std():
    assert rcp.olympic_mean([1, 2, 3, 10]) == 2.5
    assert rcp.olympic_mean([4, 6]) == 5  # fewer than 3: nothing dropped
    assert rcp.population_std([1, 3]) == 1.0


# ---------------------------------------------------------------------- verdicts


def test_verdicts_at_a_measured_rcp(benchmarks):
    bench = benchmarks["resnet"]
    p, _ = bench.reference_at(3264)
    within = rcp.classify(bench, 3264, [35.0])
    assert within.verdict == "within" and within.where == "measured" and within.reference is p
    assert within.lower == pytest.approx(rcp.lower_bound(p, 1)) and within.upper == pytest.approx(2 * p.mean - within.lower)
    assert within.speedup == pytest.approx(p.mean / 35.0)
    assert rcp.classify(bench, 3264, [within.lower - 0.01]).verdict == "faster"
    assert rcp.classify(bench, 3264, [within.upper + 0.01]).verdict == "slower"
    assert rcp.classify(bench, 3264, [None]).verdict == "not reached"


def test_run_sets_are_scored_as_mlperf_scores_a_submission(benchmarks):
    bench = benchmarks["resnet"]
    # five runs, one never converged: dropped as the slowest, the fastest too; the middle three averaged
    five = rcp.classify(bench, 3264, [30.0, 35.0, 35.0, 36.0, None])
    assert (five.verdict, five.mean, five.averaged, five.reached) == ("within", pytest.approx(106 / 3), 3, 4)
    assert five.lower == pytest.approx(five.mlperf_lower)  # 5 runs, 3 averaged: MLPerf's own bound
    assert rcp.classify(bench, 3264, [35.0, 35.0, 35.0, None, None]).verdict == "not reached"
    assert rcp.classify(bench, 3264, [35.0, None]).verdict == "not reached"  # under 3 runs nothing is dropped


def test_batches_outside_and_between_the_rcps(benchmarks):
    bench = benchmarks["resnet"]
    below = rcp.classify(bench, 256, [34.0])
    assert below.where == "below" and below.reference.batch == 1632 and below.verdict == "within"
    assert rcp.classify(bench, 131072, [90.0]).verdict == "no reference"
    pruned = rcp.classify(bench, 4096, [36.0])  # a measured RCP MLPerf prunes: interpolated instead
    assert pruned.where == "interpolated" and pruned.reference.interpolated and pruned.verdict == "within"


def test_bert_samples_verdicts(benchmarks):
    bench = benchmarks["bert"]
    assert rcp.classify(bench, 8192, [3.8e6]).verdict == "within"
    assert rcp.classify(bench, 8192, [3.2e6]).verdict == "faster"
    assert rcp.classify(bench, 8192, [4.4e6]).verdict == "slower"
    assert rcp.classify(bench, 32768, [6e6]).verdict == "no reference"


# ---------------------------------------------------------------------- run folders and lb-report


def make_run(root: Path, name: str, *, batch: int = 3264, reach: int | None = 35, seed: int = 0,
             optimizer: str = "lars_mlperf", epoch: int = IMAGENET, status: str = "finished",
             stop_at: dict | None = None, model: dict | None = None, eval_epochs: int | None = None) -> Path:
    """A run folder as lb-train writes it for the resnet50_mlperf_lars recipe: one eval per epoch, top-1 rising
    linearly to 0.759 at epoch ``reach`` (None: it stalls at 0.75)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"batch": batch, "seed": seed, "epochs": 41.0, "micro_batch": 204, "stages": [], "progress": False,
           "optimizer": {"name": optimizer, "lr": 10.5, "weight_decay": 2e-4, "eps": 0.0},
           "scaling": {"rule": "none", "ref_batch": 3264},
           "schedule": {"name": "poly", "warmup_epochs": 2.0, "power": 2.0, "end_lr": 1e-4},
           "model": model or {"name": "resnet", "depth": 50, "num_classes": 1000, "label_smoothing": 0.1},
           "data": {"name": "imagefolder", "train_samples": None}, "logger": {"name": "none"}}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    per_epoch = epoch // batch
    plan = [{"name": "train", "batch": batch, "micro_batch": 204, "world_size": 16, "accumulation": 1,
             "seq_len": None, "train_samples": epoch, "epochs": 41.0, "steps_per_epoch": per_epoch,
             "total_steps": 41 * per_epoch, "lr": 10.5, "warmup_epochs": 2.0, "warmup_steps": 2 * per_epoch}]
    (run / "plan.json").write_text(json.dumps(plan))
    last = eval_epochs or (reach if reach is not None else 41)
    lines = [{"step": e * per_epoch, "stage": "train", "samples": e * epoch, "eval/loss": 3.0 - e / 20,
              "eval/accuracy": 0.759 * e / reach if reach else min(0.75, 0.02 * e)} for e in range(1, last + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if status == "finished":
        summary = {"steps": lines[-1]["step"], "samples": lines[-1]["samples"], "wall_time_s": 1000.0,
                   "samples_per_s": 1e4, "optimizer": optimizer, "batch": batch,
                   "eval/accuracy": lines[-1]["eval/accuracy"], "eval/loss": lines[-1]["eval/loss"]}
        if stop_at is not None:
            summary["stop_at"] = stop_at
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "status.json").write_text(json.dumps({"status": status}))
    return run


def test_time_to_target_reads_stop_at_or_the_eval_lines(tmp_path, benchmarks):
    bench = benchmarks["resnet"]
    plain = make_run(tmp_path, "plain", reach=35)
    # stopped exactly at MLPerf's target: the summary's record is used (here it says epoch 34)
    stopped = make_run(tmp_path, "stopped", reach=35, stop_at={"metric": "eval/accuracy", "target": 0.759,
                                                                "reached": True, "step": 34 * 392, "samples": 34 * IMAGENET})
    # stopped at a looser target of its own: MLPerf's is read from the eval lines
    loose = make_run(tmp_path, "loose", reach=35, stop_at={"metric": "eval/accuracy", "target": 0.7,
                                                            "reached": True, "step": 1, "samples": 1})
    rows = {Path(r["_dir"]).name: r for r in collect_runs([tmp_path])}
    assert mlperf.time_to_target(rows["plain"], bench) == {"steps": 35 * 392, "samples": 35 * IMAGENET, "value": 35.0}
    assert mlperf.time_to_target(rows["stopped"], bench)["value"] == 34.0
    assert mlperf.time_to_target(rows["loose"], bench)["value"] == 35.0
    assert stopped.exists() and plain.exists() and loose.exists()


def test_match_names_the_mlperf_workloads(tmp_path):
    make_run(tmp_path, "lars", optimizer="lars_mlperf")
    make_run(tmp_path, "sgd", optimizer="sgd")
    make_run(tmp_path, "subset", epoch=50000)
    make_run(tmp_path, "bert_large", optimizer="lamb", model={"name": "bert", "size": "large"})
    make_run(tmp_path, "bert_tiny", optimizer="lamb", model={"name": "bert", "size": "tiny"})
    found = {Path(r["_dir"]).name: mlperf.match(r) for r in collect_runs([tmp_path])}
    assert found["lars"] == ("resnet", None)
    assert found["sgd"][0] is None and "LARS" in found["sgd"][1]
    assert found["subset"][0] is None and "ImageNet-1k" in found["subset"][1]
    assert found["bert_large"][0] is None and "phase-1 checkpoint" in found["bert_large"][1]
    assert found["bert_tiny"] == (None, None)


def test_lb_report_draws_and_judges_the_rcp_overlay(tmp_path):
    runs = tmp_path / "runs"
    for seed, reach in enumerate((35, 35, 36)):
        make_run(runs, f"b3264_s{seed}", batch=3264, reach=reach, seed=seed)
    make_run(runs, "b1632", batch=1632, reach=30)  # faster than the RCP allows
    make_run(runs, "b32768", batch=32768, reach=70)  # slower
    make_run(runs, "b8192", batch=8192, reach=None)  # never reaches 75.9%
    make_run(runs, "b131072", batch=131072, reach=90)  # past the largest RCP
    make_run(runs, "b13056_running", batch=13056, reach=None, status="running", eval_epochs=10)
    make_run(runs, "sgd", batch=3264, optimizer="sgd")
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--no-paper"]) == 0
    text = (out / "table.md").read_text()
    section = text.split("## Against MLPerf's reference convergence points")[1].split("\n## ")[0]
    lines = {ln.split(":")[0].lstrip("- "): ln for ln in section.splitlines() if ln.startswith("- lars_mlperf")}
    assert "within the reference's spread" in lines["lars_mlperf batch 3264"]
    assert "the mean of 1 run(s)" in lines["lars_mlperf batch 3264"]  # 3 seeds: the middle one
    assert "opt_weight_decay 0.0002 (RCP 5e-05)" in lines["lars_mlperf batch 3264"]
    assert "suspicious" in lines["lars_mlperf batch 1632"]
    assert "slower than the reference" in lines["lars_mlperf batch 32768"]
    assert "did not reach the target" in lines["lars_mlperf batch 8192"]
    assert "no reference" in lines["lars_mlperf batch 131072"]
    assert "1 unfinished run(s) not counted" in lines["lars_mlperf batch 13056"]
    assert "Not compared: ResNet-50 with sgd" in section
    assert "training 4.0.0" in section and "mlperf_logging/rcp_checker/training_4.0.0/rcps_resnet.json" in section
    table_rows = [ln for ln in section.splitlines() if ln.startswith("| lars_mlperf batch 3264")]
    assert table_rows and "| 3/3 | 35 |" in table_rows[0] and "35.15 (34–37)" in table_rows[0]
    assert (out / "mlperf_rcp.png").stat().st_size > 10_000
    prov = json.loads((out / "provenance.json").read_text())["mlperf_reference"]["resnet"]
    assert prov["commit"] == json.loads(rcp.REFERENCE_FILE.read_text())["source"]["commit"]


def test_lb_report_without_an_mlperf_workload_says_nothing_of_it(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "fashion", optimizer="lars_mlperf", model={"name": "resnet", "depth": 20}, epoch=60000)
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--no-paper"]) == 0
    assert "MLPerf" not in (out / "table.md").read_text()
    assert not (out / "mlperf_rcp.png").exists()
    assert "mlperf_reference" not in json.loads((out / "provenance.json").read_text())


def test_a_near_miss_alone_is_explained_without_a_plot(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "bert_large", optimizer="lamb", model={"name": "bert", "size": "large"})
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--no-paper"]) == 0
    assert "Not compared: BERT-Large with LAMB" in (out / "table.md").read_text()
    assert not (out / "mlperf_rcp.png").exists()


def test_bert_comparison_and_plot_in_samples(tmp_path, benchmarks):
    """No recipe of ours is MLPerf's BERT phase (see match), so the BERT path is exercised on runs handed to it
    directly: samples are the unit, and the plot draws the BERT RCPs."""
    runs = tmp_path / "runs"
    for seed in range(3):
        make_run(runs, f"s{seed}", batch=8192, optimizer="lamb", epoch=1_000_000, reach=(3, 5, 6)[seed], seed=seed,
                 model={"name": "bert", "size": "large"})
    rows = collect_runs([runs])
    comparison = mlperf.compare_set(benchmarks["bert"], rows)
    assert sorted(r["value"] for r in comparison.runs) == [3e6, 5e6, 6e6]  # samples, not epochs
    assert comparison.verdict.verdict == "slower"  # the middle run, 5M, against 3.81M interpolated
    report = mlperf.MlperfReport([comparison], [])
    assert "samples to eval masked-LM accuracy 0.72" in "\n".join(report.markdown())
    assert mlperf.plot(report, tmp_path / "bert.png").stat().st_size > 10_000
