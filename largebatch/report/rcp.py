"""MLPerf Training's reference convergence points (RCPs), and whether runs converge as fast as they do.

An RCP is a reference recipe at one global batch, run many times, with how long each run took to reach
the benchmark's target (ResNet-50: epochs to 75.9% top-1; BERT: samples to 0.720 masked-LM accuracy). The
numbers are bundled in ``reference/mlperf_rcps.json`` with their source (repository, commit, path, blob);
tests/test_mlperf_rcp.py checks them against verbatim copies of the source files.

The statistics follow the MLPerf RCP checker (``mlperf_logging/rcp_checker/rcp_checker.py``), rewritten:

- an RCP's mean is olympic (its fastest and slowest runs dropped), its spread the population std of all runs;
- RCPs are pruned first: those at batches below the fastest-converging one, then, walking up the batches,
  any slower than the straight line between its neighbours;
- a batch between two kept RCPs gets a linear interpolation of their means and stds, counted as
  2 x the benchmark's submission size of runs; a batch below the smallest kept RCP is compared with it;
  above the largest, there is no reference (MLPerf asks the submitter for a new RCP);
- a set of runs is summarised by its olympic mean (with 3 or more runs; a run that never reached the target
  counts as infinitely slow, so one such run is dropped and two fail the set, as in MLPerf);
- MLPerf rejects a submission whose mean is faster than a one-sided t-test at alpha 0.05 allows
  (equal variances, the RCP's std): ``mean < rcp_mean - t(0.95, df) * std * sqrt(1/n_rcp + 1/n_runs)``,
  with n_runs = the submission size less 2. It accepts any slower mean.

What this module adds (:func:`classify`): the same test is made with the runs actually averaged (one run:
n_runs = 1), and mirrored above the mean to call a set of runs "slower"; MLPerf's own bound for a full
submission is reported beside it. Verdicts: ``within`` (inside both bounds), ``faster`` (below the lower
bound: suspicious, MLPerf's checker would reject it), ``slower``, ``not reached``, ``no reference``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from largebatch.protocol import t_quantile

REFERENCE_FILE = Path(__file__).parent / "reference" / "mlperf_rcps.json"
ALPHA = 0.05  # the checker's one-sided significance level
VERDICTS = ("within", "faster", "slower", "not reached", "no reference")


@dataclass(frozen=True)
class Point:
    """A reference convergence point: measured (with its runs) or interpolated between two measured ones."""

    batch: int
    mean: float  # olympic mean, in the benchmark's unit
    std: float  # population std of every run
    n: int  # the runs the t-test counts for the reference
    runs: tuple = ()  # the measured runs (none when interpolated)
    hyperparameters: dict = field(default_factory=dict)
    name: str = ""

    @property
    def interpolated(self) -> bool:
        return not self.runs


@dataclass(frozen=True)
class Benchmark:
    name: str  # "resnet" | "bert"
    info: dict  # the benchmark's entry of the reference file less its RCPs: title, version, path, target, unit...
    points: tuple  # every measured RCP, smallest batch first
    source: dict  # the repository, commit and checker the file was transcribed from

    @property
    def unit(self) -> str:
        return self.info["unit"]

    @property
    def target(self) -> float:
        return self.info["target"]

    @property
    def submission_runs(self) -> int:
        return self.info["submission_runs"]

    def kept(self) -> list[Point]:
        """The RCPs the checker uses (its default "pruned" pass), smallest batch first."""
        fastest = min(self.points, key=lambda p: p.mean)
        kept = [p for p in self.points if p.batch >= fastest.batch]
        i = 1
        while i < len(kept) - 1:  # one walk up the batches; a removal re-tests the new i-th point
            if kept[i].mean > self._between(kept[i - 1], kept[i + 1], kept[i].batch).mean:
                del kept[i]
            else:
                i += 1
        return kept

    def _between(self, low: Point, high: Point, batch: int) -> Point:
        share = (batch - low.batch) / (high.batch - low.batch)
        return Point(batch, low.mean + share * (high.mean - low.mean), low.std + share * (high.std - low.std),
                     2 * self.submission_runs, name=f"interpolated between {low.batch} and {high.batch}")

    def reference_at(self, batch: int) -> tuple[Point | None, str]:
        """(the point a run set at ``batch`` is compared with, how it was found): "measured", "interpolated",
        "below" (the smallest kept RCP) or "above" (None: past the largest)."""
        kept = self.kept()
        for p in kept:
            if p.batch == batch:
                return p, "measured"
        if batch < kept[0].batch:
            return kept[0], "below"
        if batch > kept[-1].batch:
            return None, "above"
        low = max((p for p in kept if p.batch < batch), key=lambda p: p.batch)
        high = min((p for p in kept if p.batch > batch), key=lambda p: p.batch)
        return self._between(low, high, batch), "interpolated"

    def mlperf_lower_bound(self, point: Point) -> float:
        """The fastest mean MLPerf's checker accepts for a full submission at ``point``'s batch."""
        return lower_bound(point, self.submission_runs - 2)


def olympic_mean(values: list[float]) -> float:
    """The mean without the smallest and the largest value (all of them with fewer than 3)."""
    ordered = sorted(values)
    kept = ordered[1:-1] if len(ordered) >= 3 else ordered
    return math.fsum(kept) / len(kept)


def population_std(values: list[float]) -> float:
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


def margin(point: Point, n_runs: int) -> float:
    """How far below (or above) the RCP mean a mean of ``n_runs`` runs may sit before a one-sided t-test
    (alpha 0.05, equal variances, the RCP's std) calls it faster (slower)."""
    df = point.n + n_runs - 2
    if point.std == 0 or df < 1:
        return 0.0
    return t_quantile(1 - ALPHA, df) * point.std * math.sqrt(1 / point.n + 1 / n_runs)


def lower_bound(point: Point, n_runs: int) -> float:
    return point.mean - margin(point, n_runs)


def load_benchmarks(path: Path = REFERENCE_FILE) -> dict[str, Benchmark]:
    data = json.loads(Path(path).read_text())
    out = {}
    for name, entry in data["benchmarks"].items():
        points = tuple(sorted((Point(r["batch"], olympic_mean(r["runs"]), population_std(r["runs"]),
                                     len(r["runs"]) - 2, tuple(r["runs"]), dict(r["hyperparameters"]), r["name"])
                               for r in entry["rcps"]), key=lambda p: p.batch))
        info = {k: v for k, v in entry.items() if k != "rcps"}
        out[name] = Benchmark(name, info, points, data["source"])
    return out


@dataclass
class Verdict:
    verdict: str  # one of VERDICTS
    batch: int
    runs: int  # runs in the set
    reached: int  # of them, those that reached the target
    averaged: int = 0  # runs in the olympic mean
    mean: float | None = None  # olympic mean of the set (None: not reached)
    reference: Point | None = None
    where: str = ""  # how the reference was found: measured | interpolated | below | above
    lower: float | None = None  # the bounds for a mean of this many runs
    upper: float | None = None
    mlperf_lower: float | None = None  # MLPerf's own bound for a full submission
    speedup: float | None = None  # RCP mean / our mean, where faster than the RCP mean (MLPerf scales by it)


def classify(benchmark: Benchmark, batch: int, values: list[float | None]) -> Verdict:
    """The verdict on runs at ``batch`` that reached the target after ``values`` (the benchmark's unit; None:
    never reached it). See the module's docstring for the rule."""
    reached = [v for v in values if v is not None]
    verdict = Verdict("not reached", batch, len(values), len(reached))
    reference, where = benchmark.reference_at(batch)
    verdict.reference, verdict.where = reference, where
    trimmed = sorted(reached) + [math.inf] * (len(values) - len(reached))
    trimmed = trimmed[1:-1] if len(trimmed) >= 3 else trimmed
    if not trimmed or math.inf in trimmed:
        return verdict
    verdict.mean, verdict.averaged = math.fsum(trimmed) / len(trimmed), len(trimmed)
    if reference is None:
        verdict.verdict = "no reference"
        return verdict
    half = margin(reference, len(trimmed))
    verdict.lower, verdict.upper = reference.mean - half, reference.mean + half
    verdict.mlperf_lower = benchmark.mlperf_lower_bound(reference)
    if verdict.mean < reference.mean:
        verdict.speedup = reference.mean / verdict.mean
    verdict.verdict = ("faster" if verdict.mean < verdict.lower else "slower" if verdict.mean > verdict.upper
                       else "within")
    return verdict
