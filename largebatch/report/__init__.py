"""Results reports: run folders written by `lb-train` -> runs.csv, table.md, plots, provenance.json.

    from largebatch.report import collect_runs, write_report
    rows = collect_runs([Path("outputs/multiruns/2026-11-25_22-00-00")])
    write_report(rows, Path("results/lamb_table1"), unigram=unigram_baseline_from_run(run_dir))

Command line: ``lb-report SWEEP_OR_RUN_DIR [...] --out results/lamb_table1`` (see :mod:`.cli`).
"""

from largebatch.report.cli import main
from largebatch.report.runs import RUN_COLUMNS, collect_runs, find_run_dirs
from largebatch.report.summary import findings, group_cells
from largebatch.report.unigram import unigram_baseline, unigram_baseline_from_data, unigram_baseline_from_run
from largebatch.report.write import write_report

__all__ = ["RUN_COLUMNS", "collect_runs", "find_run_dirs", "findings", "group_cells", "main", "unigram_baseline",
           "unigram_baseline_from_data", "unigram_baseline_from_run", "write_report"]
