"""lb-report's scaling measures on hand-made run folders: steps and samples to a target loss (Shallue et al.
2018) against perfect scaling, the gradient noise scale B_simple (McCandlish et al. 2018) and the rungs beyond
it, noise bands from the seed spread, and the unigram baseline scored on exactly the runs' eval tokens."""

from __future__ import annotations

import contextlib
import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf
from test_report import BUDGET, make_run

from largebatch.report import collect_runs, findings, write_report
from largebatch.report.runs import noise_scale_summary, to_target

EVALS = 4  # eval points per run, at 1/4, 2/4, 3/4 and all of the sample budget


def scaling_run(root, name, *, optimizer: str, batch: int, curve: list[float], seed: int = 0,
                noise=None, config: dict | None = None):
    """A finished single-stage run of ``BUDGET`` samples whose eval losses at the EVALS points are ``curve``;
    ``noise(step, steps)``: its logged "noise/b_simple" per log line (None: a trainer that logs none)."""
    steps = BUDGET // batch
    run = make_run(root, name, optimizer=optimizer, stages=[(batch, 32, steps)], eval_loss=curve[-1], seed=seed,
                   config=config)
    lines = []
    for step in range(1, steps + 1):
        line = {"step": step, "stage": "stage0", "samples": step * batch, "loss": 5.0, "lr": 1e-3}
        if noise is not None:
            value = noise(step, steps)  # |G|^2 = 1 and one sample per loss unit: trace = B_simple
            line.update({"noise/b_simple": value, "noise/grad_sq": 1.0, "noise/trace": value})
        lines.append(line)
        if step % (steps // EVALS) == 0:
            lines.append({"step": step, "stage": "stage0", "samples": step * batch,
                          "eval/loss": curve[step * EVALS // steps - 1], "eval/accuracy": 0.3, "eval/tokens": 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return run


def ladder(root, optimizer: str, finals: dict[int, list[float]], **kw):
    """One run per batch and seed, each ending at its final loss, falling by 0.5 per eval point before it."""
    for batch, losses in finals.items():
        for seed, loss in enumerate(losses):
            scaling_run(root, f"{optimizer}_b{batch}_s{seed}", optimizer=optimizer, batch=batch, seed=seed,
                        curve=[loss + 1.5, loss + 1.0, loss + 0.5, loss], **kw)


def test_steps_to_target_interpolates_between_the_bracketing_eval_points():
    points = [{"step": 10, "samples": 40, "loss": 5.0}, {"step": 20, "samples": 80, "loss": 4.0},
              {"step": 30, "samples": 120, "loss": 3.0}]
    assert to_target(points, 3.5) == {"steps": 25.0, "samples": 100.0, "first_point": False}
    assert to_target(points, 4.75) == {"steps": 12.5, "samples": 50.0, "first_point": False}
    assert to_target(points, 4.0)["steps"] == 20.0  # exactly at an eval point: that point
    assert to_target(points, 6.0) == {"steps": 10.0, "samples": 40.0, "first_point": True}  # nothing earlier
    assert to_target(points, 2.9) is None


def perfect_scaling_sweep(root):
    """lamb scales perfectly to batch 16 and falls off at 64; adamw's batch 16 never reaches the target."""
    curves = {("lamb", 4): [6.0, 5.0, 4.6, 4.4], ("lamb", 16): [5.5, 4.9, 4.7, 4.5], ("lamb", 64): [6.0, 5.8, 5.4, 4.9],
              ("adamw", 4): [6.0, 5.0, 4.8, 4.6], ("adamw", 16): [6.0, 5.6, 5.3, 5.1],
              ("adamw", 64): [6.0, 5.5, 5.2, 4.95]}
    for (opt, batch), curve in curves.items():
        scaling_run(root, f"{opt}_b{batch}", optimizer=opt, batch=batch, curve=curve)
    return collect_runs([root])


def test_target_is_the_worse_base_rung_at_half_budget_and_steps_are_exact(tmp_path):
    rows = perfect_scaling_sweep(tmp_path)
    text = "\n".join(findings(rows, tolerance=0.05))
    by = {(r["optimizer"], r["batch"]): r for r in rows}
    # both base rungs are at 5.0 at their eval point closest to half of 1024 samples (512): target 5.0
    assert by[("lamb", 4)]["steps_to_target"] == 128 and by[("lamb", 4)]["samples_to_target"] == 512
    # batch 16: 5.5 at step 16, 4.9 at step 32: crosses 5.0 at 16 + 16 * 0.5 / 0.6
    assert by[("lamb", 16)]["steps_to_target"] == pytest.approx(16 + 16 * 5 / 6)
    assert by[("lamb", 16)]["samples_to_target"] == pytest.approx(16 * (16 + 16 * 5 / 6))
    assert by[("lamb", 64)]["steps_to_target"] == pytest.approx(15.2)  # 5.4 at 12, 4.9 at 16
    assert by[("adamw", 16)]["steps_to_target"] is None
    assert ("lamb: steps to target stay within 1.5x of perfect scaling (steps halve when the batch doubles) up to "
            "batch 16; at batch 64 they are 1.9x the perfect-scaling count. From batch 4 to 64 (the largest batch "
            "that reached it) the steps to target fall from 128 to 15.2: a 8.42x speed-up in steps (perfect "
            "scaling: 16x).") in text
    assert "adamw: steps to target stay within 1.5x of perfect scaling (steps halve when the batch doubles) at no " \
           "rung above its base; batch 16 never reached the target." in text
    # a looser factor lets lamb's batch 64 count as scaling
    loose = "\n".join(findings(rows, scaling_factor=2.0))
    assert "lamb: steps to target stay within 2x of perfect scaling (steps halve when the batch doubles) up to " \
           "batch 64, the top of its ladder." in loose
    # a later fraction: the base rungs at 768 samples, 4.6 (lamb) and 4.8 (adamw): the target is adamw's 4.8
    later = "\n".join(findings(rows, target_fraction=0.75))
    assert by[("lamb", 4)]["steps_to_target"] == pytest.approx(128 + 64 * 0.2 / 0.4)
    assert by[("adamw", 64)]["steps_to_target"] is None and "lamb: steps to target" in later


def test_cells_average_the_seeds_that_reached_the_target(tmp_path):
    for seed, curve in enumerate(([6.0, 5.0, 4.6, 4.4], [6.0, 5.0, 4.6, 4.4])):
        scaling_run(tmp_path, f"lamb_base{seed}", optimizer="lamb", batch=4, seed=seed, curve=curve)
    scaling_run(tmp_path, "adamw_base", optimizer="adamw", batch=4, curve=[6.0, 4.9, 4.7, 4.5])
    # the target is lamb's 5.0; at batch 64, seed 0 reaches it at its third eval point (step 12), seed 1 never
    scaling_run(tmp_path, "lamb_top0", optimizer="lamb", batch=64, seed=0, curve=[6.0, 5.5, 5.0, 4.8])
    scaling_run(tmp_path, "lamb_top1", optimizer="lamb", batch=64, seed=1, curve=[6.0, 5.8, 5.6, 5.4])
    rows = collect_runs([tmp_path])
    out = tmp_path / "out"
    write_report(rows, out, paper_table=False)
    md = (out / "table.md").read_text()
    assert "| eval acc | steps to target | samples to target | downstream acc |" in md
    assert "B_noise" not in md.split("## What this shows")[0]  # no run logged the noise scale
    assert "| 12 (1/2 seeds reached it) | 768 (1/2 seeds reached it) |" in md
    assert "| 128 ± 0 | 512 ± 0 |" in md
    assert "Target eval loss: **5.0000** (nats), the eval loss of lamb's base rung." in md
    assert "lamb batch 4: 5.0000 (mean of 2 seed(s), at 512 samples); adamw batch 4: 4.9000" in md
    assert (out / "steps_to_target.png").stat().st_size > 5000
    csv_text = (out / "runs.csv").read_text()
    assert ",12.0,768.0," in csv_text  # runs.csv: the run's own steps and samples to target


def test_a_rule_that_holds_and_one_that_fails(tmp_path):
    """Interval verdicts, margin 0.05 nats: seeds 0.002 apart resolve every rung; adamw fails at 64."""
    ladder(tmp_path, "lamb", {4: [4.000, 4.002], 16: [4.010, 4.012], 64: [4.020, 4.022]})
    ladder(tmp_path, "adamw", {4: [4.000, 4.002], 16: [4.030, 4.032], 64: [4.300, 4.302]})
    text = "\n".join(findings(collect_runs([tmp_path]), tolerance=0.05))
    assert ("lamb holds its base rung's loss (batch 4, margin 0.05 nats, 95% intervals) at every rung, to batch 64, "
            "the top of its ladder.") in text
    assert ("adamw holds its base rung's loss (batch 4, margin 0.05 nats, 95% intervals) up to batch 16; batch 64 "
            "fails (gap +0.3 [") in text
    assert "lamb is better than adamw by 0.28 at batch 64, beyond the seed spread" in text
    assert "Verdict: yes, lamb holds its loss further up the ladder than adamw" in text
    assert "single seed" not in text  # every cell has two seeds: no single-seed caveat


def test_the_opposite_is_said_plainly(tmp_path):
    ladder(tmp_path, "lamb", {4: [4.000, 4.002], 16: [4.200, 4.202], 64: [4.500, 4.502]})
    ladder(tmp_path, "adamw", {4: [4.000, 4.002], 16: [4.010, 4.012], 64: [4.020, 4.022]})
    text = "\n".join(findings(collect_runs([tmp_path])))
    assert ("Verdict: no, lamb does not hold its loss further up the ladder than adamw: adamw holds up to batch 64, "
            "lamb at most up to 4.") in text
    assert "lamb holds its base rung's loss (batch 4, margin 0.05 nats, 95% intervals) at no rung above the base" in text
    assert "adamw is better than lamb by 0.48 at batch 64, beyond the seed spread" in text


def test_seeds_too_far_apart_leave_the_verdict_unresolved(tmp_path):
    """The band rule used to call both ladders flat here (2 x the pooled std 0.57 > the rise); the intervals
    say the two seeds cannot tell, and how many would."""
    ladder(tmp_path, "lamb", {4: [4.0, 4.4], 16: [4.05, 4.45], 64: [4.1, 4.5]})
    ladder(tmp_path, "adamw", {4: [4.0, 4.4], 16: [4.1, 4.5], 64: [4.2, 4.6]})
    text = "\n".join(findings(collect_runs([tmp_path]), tolerance=0.05))
    spread = f"{statistics.stdev([4.0, 4.4]):.2g}"
    assert f"lamb is better than adamw by 0.1 at batch 64, within the seed spread ({spread}, {spread})" in text
    assert "Verdict: unresolved: lamb holds up to batch 4 (possibly 64), adamw up to 4 (possibly 64)" in text
    assert "batch 64 unresolved, needs > 100 seeds" in text or "batch 64 unresolved, needs ~" in text
    assert "beyond the seed spread" not in text


def test_a_gap_must_exceed_both_cells_spreads(tmp_path):
    ladder(tmp_path, "lamb", {4: [4.0, 4.02], 64: [4.0, 4.02]})
    ladder(tmp_path, "adamw", {4: [4.0, 4.02], 64: [4.0, 4.4]})  # wider than lamb's spread, narrower than its own
    text = "\n".join(findings(collect_runs([tmp_path])))
    assert "lamb is better than adamw by 0.19 at batch 64, within the seed spread (0.014, 0.28)" in text


def test_single_seed_caveat_names_only_the_single_seed_cells(tmp_path):
    ladder(tmp_path, "lamb", {4: [4.00, 4.02], 64: [4.02]})
    ladder(tmp_path, "adamw", {4: [4.00, 4.02], 64: [4.30, 4.32]})
    text = "\n".join(findings(collect_runs([tmp_path])))
    assert "This cell has a single seed (lamb batch 64): a difference of this size may be seed noise" in text
    assert "lamb is better than adamw by 0.29 at batch 64, a single seed on one side, so no spread to compare" in text


def test_noise_scale_summary_divides_the_means_over_the_last_half():
    """Each component averaged over the last half, then divided (not a mean of per-line ratios, which a
    |G|^2 estimate near zero would rule), converted to samples at 5 loss units a sample."""
    def line(step, trace, grad_sq):
        return {"step": step, "loss": 1.0, "noise/trace": trace, "noise/grad_sq": grad_sq,
                "noise/b_simple": trace / grad_sq / 5 if grad_sq > 0 else None}

    lines = [line(s, 100.0, 1.0) for s in range(1, 6)] + [line(6, 30.0, 0.01), line(7, 50.0, 2.0), line(8, 40.0, -0.5),
                                                          line(9, 60.0, 1.5), line(10, 20.0, 1.0)]
    want = statistics.fmean([30.0, 50.0, 40.0, 60.0, 20.0]) / statistics.fmean([0.01, 2.0, -0.5, 1.5, 1.0]) / 5
    assert noise_scale_summary(lines, 10) == pytest.approx(want)
    assert noise_scale_summary([{"step": 1, "loss": 1.0}], 1) is None  # an older trainer: no noise keys


def test_noise_scale_and_the_rungs_beyond_it(tmp_path):
    batches = (4, 16, 64, 128)
    for opt, finals in (("lamb", (4.00, 4.01, 4.30, 4.60)), ("adamw", (4.10, 4.12, 4.50, 4.80))):
        for batch, loss in zip(batches, finals):
            for seed in (0, 1):
                # B_simple grows from 10 to (40 + 10 seed) at half-time: the last half averages 40 and 50
                scaling_run(tmp_path, f"{opt}_b{batch}_s{seed}", optimizer=opt, batch=batch, seed=seed,
                            curve=[loss + 1.5, loss + 1.0, loss + 0.5, loss + 0.01 * seed],
                            noise=lambda step, steps, seed=seed: (None if step < 2 else
                                                                  10.0 if step <= steps / 2 else 40.0 + 10 * seed))
    scaling_run(tmp_path, "lamb_old", optimizer="lamb", batch=4, curve=[6, 5, 4.5, 4.0],
                config={"data": {"max_documents": 100}})  # an older run in another configuration: no noise keys
    rows = collect_runs([tmp_path])
    by = {(r["optimizer"], r["batch"], r["seed"]): r for r in rows if "max_documents=100" not in r["differs_in"]}
    assert by[("lamb", 4, 0)]["b_noise"] == 40.0 and by[("lamb", 4, 1)]["b_noise"] == 50.0
    assert next(r for r in rows if "max_documents=100" in r["differs_in"])["b_noise"] is None
    text = "\n".join(findings(rows))
    assert ("Measured critical batch (lamb): the gradient noise scale B_simple, averaged over the last half of each "
            "run, is ~45 samples: the median of the 8 run(s) of its ladder where it is measurable (range 40 to 50; "
            "B_simple grows as the loss falls, so this is the workload's scale near the end of these runs). Rungs "
            "64, 128 lie beyond the measured noise scale (~45 samples). The first rung not shown to hold the base's "
            "loss is 64, the first beyond B_noise is 64: it is the first rung beyond the noise scale.") in text
    assert "Measured critical batch (adamw)" in text

    out = tmp_path / "out"
    write_report(rows, out, paper_table=False)
    md = (out / "table.md").read_text()
    ours = md.split("## What this shows")[0]
    assert "| steps to target | samples to target | B_noise | downstream acc |" in ours
    assert f"| 45 ± {statistics.stdev([40.0, 50.0]):.3g} |" in ours and "B_noise: the gradient noise scale" in ours
    assert "![noise_scale.png](noise_scale.png)" in md
    assert (out / "noise_scale.png").stat().st_size > 5000


def test_no_rung_beyond_the_noise_scale_is_said(tmp_path):
    ladder(tmp_path, "lamb", {4: [4.0], 16: [4.01]}, noise=lambda step, steps: 500.0)
    text = "\n".join(findings(collect_runs([tmp_path])))
    assert "is ~500 samples: the median of the 2 run(s)" in text
    assert "No rung of its ladder lies beyond it: the largest batch, 16" in text
    # one seed a cell: no interval, so 16 is not shown to hold
    assert "the first beyond B_noise is none: a rung stops being shown to hold although none is beyond" in text


class _FakeAccelerator:
    process_index, num_processes, device = 0, 1, "cpu"

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction):
        return tensor


class _CountingModel(torch.nn.Module):
    """Scores nothing, counts the masked tokens it is shown: the eval/tokens a run of this config records."""

    def forward(self, input_ids, labels, **_):
        return {"loss_sum": torch.zeros(()), "count": (labels != -100).sum(), "correct": torch.zeros(())}


def test_unigram_baseline_scores_exactly_the_runs_eval_tokens(tmp_path, data_cache):
    from types import SimpleNamespace

    from largebatch.config import compose
    from largebatch.report.unigram import unigram_baseline_from_data, unigram_baseline_from_run
    from largebatch.report.write import _unigram_lines
    from largebatch.tasks.mlm import MaskedLMTask

    cfg = compose(["scale=tiny", "data.max_documents=200", f"data.cache_dir={data_cache}", "eval_batch=5",
                   "eval_max_batches=3"])
    task = MaskedLMTask(cfg)
    seq_len = cfg.data.seq_len
    assert len(task.data(seq_len).eval) > 3 * 5  # the limit matters
    # what the trainer's eval counts: the first 3 x 5 held-out sequences with their fixed masks
    run_tokens = task.evaluate(_CountingModel(), _FakeAccelerator(), SimpleNamespace(seq_len=seq_len))["eval/tokens"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "plan.json").write_text(json.dumps([{"name": "main", "batch": 32, "micro_batch": 16, "world_size": 1,
                                                "seq_len": seq_len}]))
    (run / "summary.json").write_text(json.dumps({"eval/tokens": run_tokens}))
    got = unigram_baseline_from_run(run)
    assert got["eval_tokens"] == run_tokens and got["matches_run_eval_tokens"] is True
    assert got["run_eval_tokens"] == run_tokens and got["seq_len"] == seq_len and 0 < got["loss"] < 20
    # the old count (world_size x eval_max_batches x micro_batch = 48 sequences: all 43 here) scored other tokens
    assert unigram_baseline_from_data(task.data(seq_len))["eval_tokens"] > run_tokens
    rows = [{"status": "ok", "eval_tokens": run_tokens, "seq_len": seq_len}]
    assert f"It was scored on {run_tokens} masked tokens, the same number as every finished run's own eval" \
        in " ".join(_unigram_lines(got, rows))
    other = [{"status": "ok", "eval_tokens": run_tokens + 7, "seq_len": seq_len}]
    assert (f"the runs' own eval counted {run_tokens + 7} (eval/tokens): the held-out tokens differ"
            in " ".join(_unigram_lines(got, other)))


def test_runs_whose_noise_scale_is_not_measurable_are_named(tmp_path):
    """A run whose |G|^2 estimates average to a non-positive number has no B_noise; the median comes from the
    others and the sentence says which runs had none."""
    ladder(tmp_path, "lamb", {4: [4.0], 16: [4.01], 64: [4.02]}, noise=lambda step, steps: 100.0)
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and "b4" in p.name)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        if "noise/grad_sq" in m:
            m.update({"noise/grad_sq": -1.0, "noise/b_simple": None})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    text = "\n".join(findings(collect_runs([tmp_path])))
    assert "is ~100 samples: the median of the 2 run(s)" in text
    assert "Not measurable in 1 run(s) (batch 4)" in text
