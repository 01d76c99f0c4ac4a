"""`lb-report`: turn run folders into a results folder.

    lb-report outputs/multiruns/2026-11-25_22-00-00 [MORE ...] --out outputs/report \
        [--title T] [--notes TEXT] [--unigram-from-config RUN_DIR] [--tolerance 0.05] [--no-paper]
        [--candidate lamb] [--baseline adamw] [--target-fraction 0.5] [--scaling-factor 1.5]

``--out`` is required: there is no default folder, so a bare ``lb-report`` never overwrites committed results.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from largebatch.errors import fail
from largebatch.report.runs import collect_runs
from largebatch.report.write import count_statuses, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lb-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep folders and/or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True,
                        help="results folder to write (its runs.csv, table.md, plots and provenance.json are replaced)")
    parser.add_argument("--title", default="LAMB Table 1 at reduced scale")
    parser.add_argument("--notes", default=None, help="a paragraph printed under the title")
    parser.add_argument("--unigram-from-config", type=Path, default=None, metavar="RUN_DIR",
                        help="a run folder whose config.yaml defines the data; adds the unigram baseline")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest rise of eval loss (nats) from the base to the top batch still called flat")
    parser.add_argument("--candidate", default="lamb", help="optimizer whose scaling is judged")
    parser.add_argument("--baseline", default="adamw", help="optimizer it is judged against")
    parser.add_argument("--target-fraction", type=float, default=0.5,
                        help="the target loss is the base rungs' eval loss at this fraction of their sample budget "
                             "(the worse of candidate and baseline); steps and samples to it are reported")
    parser.add_argument("--scaling-factor", type=float, default=1.5,
                        help="steps to target within this factor of perfect scaling still count as scaling")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's Table 1")
    args = parser.parse_args(argv)

    if not 0 < args.target_fraction <= 1:
        fail(f"--target-fraction must be in (0, 1], got {args.target_fraction}")
    if args.scaling_factor < 1:
        fail(f"--scaling-factor must be at least 1, got {args.scaling_factor}")
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        fail(f"no such folder: {', '.join(missing)}")
    rows = collect_runs(args.paths)
    if not rows:
        fail(f"no run folders (a folder with config.yaml) under {', '.join(map(str, args.paths))}")
    unigram = None
    if args.unigram_from_config is not None:
        from largebatch.report.unigram import unigram_baseline_from_run

        try:
            unigram = unigram_baseline_from_run(args.unigram_from_config)
        except FileNotFoundError as e:
            fail(str(e))

    from largebatch.tracking import git_state

    argv_used = sys.argv[1:] if argv is None else argv
    provenance = {"report_command": shlex.join(["lb-report", *map(str, argv_used)]), "report_git": git_state(),
                  "inputs": [str(p) for p in args.paths]}
    files = write_report(rows, args.out, unigram=unigram, paper_table=not args.no_paper, title=args.title,
                         notes=args.notes, provenance=provenance, candidate=args.candidate, baseline=args.baseline,
                         tolerance=args.tolerance, target_fraction=args.target_fraction,
                         scaling_factor=args.scaling_factor)
    print(f"{len(rows)} run(s) ({count_statuses(rows)}) -> {args.out}: " + ", ".join(files))
    return 0
