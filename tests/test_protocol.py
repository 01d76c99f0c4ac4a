"""The protocol's rules on synthetic records with known answers (largebatch/protocol.py, docs/protocol.md)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from largebatch import protocol as P


@pytest.mark.parametrize("df, q975", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_tables(df, q975):
    assert P.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-3)
    assert P.t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-3)


def test_t_interval_covers_the_mean_at_the_stated_rate():
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        ci = P.t_interval([rng.gauss(5.0, 2.0) for _ in range(3)])
        hits += ci.lo <= 5.0 <= ci.hi
    assert 0.93 < hits / 2000 < 0.97  # 95% with 3 seeds: the t quantile, not the normal one (~0.88)


def test_t_interval_of_one_value_has_no_bounds():
    ci = P.t_interval([0.9, float("nan")])
    assert ci.mean == 0.9 and ci.lo is None and ci.n == 1
    assert P.t_interval([]) is None


def test_verdict_flips_with_the_margin():
    target = [0.900, 0.901, 0.899]
    rung = [0.890, 0.891, 0.889]  # worse by 0.01, seeds 0.001 apart
    g = P.gap_interval(rung, target, higher_is_better=True)
    assert g.gap == pytest.approx(0.01)
    assert P.verdict(rung, target, 0.03, True).word == "holds"  # interval wholly below a wide margin
    assert P.verdict(rung, target, 0.0005, True).word == "fails"  # wholly above a tiny one
    middle = P.verdict(rung, target, 0.01, True)  # the margin inside the interval
    assert middle.word == "unresolved" and middle.text().startswith("unresolved, needs")


def test_a_better_rung_holds_and_lower_is_better_is_signed():
    assert P.verdict([2.0, 2.1], [3.0, 3.1], 0.01, higher_is_better=False).word == "holds"
    assert P.verdict([4.0, 4.1], [3.0, 3.1], 0.01, higher_is_better=False).word == "fails"


def test_a_one_seed_rung_borrows_only_the_targets_spread():
    g = P.gap_interval([0.80], [0.90, 0.91, 0.89], higher_is_better=True)
    assert g.method.startswith("pooled on the target")
    assert g.std == pytest.approx(statistics.stdev([0.90, 0.91, 0.89]))
    assert g.df == 2
    assert P.verdict([float("nan")], [0.9, 0.91], 0.01, True).word == "missing"


def test_seeds_needed_shrinks_as_the_gap_leaves_the_margin():
    near = P.Gap(gap=0.004, lo=0, hi=0, df=2, std=0.0045, method="welch")
    far = P.Gap(gap=0.0, lo=0, hi=0, df=2, std=0.0045, method="welch")
    # MNIST-LSTM's seed std 0.0045 against a 0.009 margin at a gap of 0: ~4 seeds by the normal approximation,
    # 6 with t quantiles of 2n - 2 df (80% power)
    assert P.seeds_needed(far, 0.009) == 6
    assert P.seeds_needed(near, 0.009) > P.seeds_needed(far, 0.009)
    assert P.seeds_needed(P.Gap(0.009, 0, 0, 2, 0.0045, "welch"), 0.009) is None  # on the margin: no N


def test_reach_reads_proven_and_possible():
    v = {b: P.Verdict(w, None) for b, w in [(2, "holds"), (4, "unresolved"), (8, "holds"), (16, "fails")]}
    assert P.reach(list(v.items()), 1) == (2, 8)
    assert P.reach([(2, P.Verdict("holds", None))], 1) == (2, 2)


def test_target_seeds_never_include_the_sweeps_run():
    assert P.target_seeds(3) == [1, 2, 3]
    assert 5 not in P.target_seeds(5, sweep_seed=5)


def test_curves_give_every_shorter_budget():
    curve = [{"epoch": e, "value": v} for e, v in [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8)]]
    assert P.metric_at_budget(curve, 3) == 0.7
    assert P.metric_at_budget(curve, 3, last=3) == pytest.approx(0.6)
    assert P.metric_at_budget(curve, 5) is None  # the run is shorter than the budget
    assert P.final_value(curve, last=3) == pytest.approx(0.7)


def test_steps_to_result_is_the_first_eval_that_strictly_beats_the_target():
    curve = [{"step": s, "samples": 10 * s, "value": v} for s, v in [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.9)]]
    assert P.steps_to_result(curve, 2.5, higher_is_better=False)["step"] == 30  # 2.5 itself does not beat it
    assert P.steps_to_result(curve, 1.0, higher_is_better=False) is None
    other = [{"step": 25, "value": 2.4}]
    assert P.min_steps_to_result([curve, other], 2.45, higher_is_better=False) == 25


def test_the_fit_recovers_a_known_critical_batch():
    s_min, b_crit = 200.0, 512.0
    batches = [32, 64, 128, 256, 512, 1024, 2048]
    rng = random.Random(1)
    exact = P.fit_critical_batch(batches, [s_min * (1 + b_crit / b) for b in batches])
    assert exact.s_min == pytest.approx(s_min) and exact.b_crit == pytest.approx(b_crit)
    noisy = P.fit_critical_batch(batches, [s_min * (1 + b_crit / b) * math.exp(rng.gauss(0, 0.05)) for b in batches])
    assert noisy.b_crit_lo < b_crit < noisy.b_crit_hi
    assert noisy.b_crit_hi - noisy.b_crit_lo < b_crit  # informative, not [0, inf]
    assert P.fit_critical_batch([32, 64], [100, 60]).b_crit_lo is None  # two points: no interval
    assert P.fit_critical_batch([32, 64], [100, 120]) is None  # more steps at the larger batch: no such curve


def test_noise_scale_by_quarter_follows_the_rise_over_training():
    lines = [{"step": s, "noise/trace": 10.0, "noise/grad_sq": 10.0 / (50 + s), "noise/b_simple": 50.0 + s}
             for s in range(1, 101)]
    quarters = P.noise_scale_by_part(lines)
    assert len(quarters) == 4 and quarters == sorted(quarters)
    assert quarters[0] == pytest.approx(50 + 13, rel=0.1) and quarters[3] == pytest.approx(50 + 88, rel=0.1)
    assert P.noise_scale_by_part([]) == [None] * 4


def test_tuning_budgets_are_declared_and_deterministic():
    grid = P.tuning_trials(0.01, 0.1, warmup_alt=0.2)
    assert len(grid) == 10 and (0.0025, 0.1) in grid and (0.04, 0.2) in grid
    assert len(P.tuning_trials(0.01, 0.0)) == 5
    halton = P.tuning_trials(0.01, 0.0, "halton:8", warmup_alt=0.4)
    assert halton == P.tuning_trials(0.01, 0.0, "halton:8", warmup_alt=0.4) and len(halton) == 8
    assert all(0.0025 <= lr <= 0.04 and 0.0 <= w <= 0.4 for lr, w in halton)
    with pytest.raises(ValueError, match="halton:N"):
        P.tuning_trials(0.01, 0.0, "random")


def test_a_row_that_did_not_train_is_caught():
    assert not P.beats_baseline([7.22, 7.15], 7.21, higher_is_better=False)
    assert P.beats_baseline([6.8, 6.9], 7.21, higher_is_better=False)
    assert not P.beats_baseline([0.7085], 0.7085, higher_is_better=True)  # the majority class is not a win


def test_the_budget_probe_finds_the_plateau_and_the_loss_minimum(tmp_path):
    import json

    from conftest import load_script

    probe = load_script("scripts/budget_probe.py")
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps([{"batch": 128, "epochs": 10, "steps_per_epoch": 10}]))
    accuracy = [0.5, 0.7, 0.8, 0.85, 0.88, 0.89, 0.89, 0.9, 0.9, 0.9]
    loss = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.42, 0.45, 0.5, 0.55]
    lines = [{"step": 10 * (e + 1), "samples": 1280 * (e + 1), "eval/accuracy": a, "eval/loss": x,
              "test/accuracy": a - 0.01} for e, (a, x) in enumerate(zip(accuracy, loss))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    found = probe.probe(run, "eval/accuracy", "test/accuracy", margin=0.01)
    # last-3 means: 0.8867 at epoch 7, 0.8933 at 8, 0.9 at 9 and 10: within 1% of 0.9 (>= 0.891) from epoch 8
    assert found["plateau"] == 8 and found["lowest_loss_epoch"] == 6
    out = probe.main([str(run), "--out", str(tmp_path / "out")])
    assert "from epoch **8** on" in (out / "table.md").read_text() and (out / "run" / "metrics.jsonl").is_file()
