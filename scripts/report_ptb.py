"""PTB LSTM LM results -> results/ptb/: the run's records and a table of ours against the references.

    python scripts/report_ptb.py RUN_DIR [--out results/ptb]

RUN_DIR is a finished `lb-train experiment=ptb_zaremba_<size>` run. The references are Zaremba, Sutskever
& Vinyals 2014 (arXiv 1409.2329, Table 1) and the TensorFlow PTB tutorial; the issue's acceptance bound
for the small model is test perplexity <= 5% above Zaremba's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.fileio import atomic_write_text  # noqa: E402
from largebatch.report.runs import user_command  # noqa: E402
from largebatch.runfolder import (  # noqa: E402
    ENV,
    RECORDS,
    SUMMARY,
    copy_records,
    read_config,
    read_json,
    read_metrics,
    read_plan,
    run_action,
    status_of,
)

REFERENCES = {  # size: (Zaremba valid, test), (TensorFlow tutorial valid, test)
    "small": ((120.7, 114.5), (121.4, 115.9)),
    "medium": ((86.2, 82.7), (86.2, 82.1)),
    "large": ((82.2, 78.4), (82.6, 78.3)),
}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "ptb")
    args = parser.parse_args()
    run = args.run_dir
    # status.json; runs of the trainer before it existed have only summary.json when they finished
    status = "finished" if run_action(run) == "skip" else status_of(run)
    if status != "finished":
        raise SystemExit(f"error: {run} is not a finished run (status {status})")

    cfg = read_config(run)
    env, summary, lines = read_json(run / ENV), read_json(run / SUMMARY), read_metrics(run)
    evals = [m for m in lines if "eval/ppl" in m]
    rates = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    size = cfg["model"]["size"]
    (paper_valid, paper_test), (tf_valid, tf_test) = REFERENCES[size]
    bound = paper_test * 1.05
    test = summary["test/ppl"]
    spe = read_plan(run)[0]["steps_per_epoch"]
    bench = REPO / "results" / "bench" / "lm.md"

    rows = [f"| {m['step'] / spe:.0f} | {m['eval/ppl']:.1f} | {m['test/ppl']:.1f} |" for m in evals]
    text = "\n".join([
        f"# PTB word-level LSTM LM, Zaremba {size}, batch {cfg['batch']}: ours vs the references",
        "",
        f"Command: `{user_command(env['command'])}`; git {env['git']['sha']}"
        f"{' (dirty)' if env['git']['dirty'] else ''}; torch {env['versions'].get('torch')}; "
        f"{env['hardware'].get('cpu')}, {env['hardware']['torch_threads']} torch thread(s); config in `config.yaml`.",
        "",
        "| | valid ppl | test ppl |",
        "|---|---|---|",
        f"| Zaremba et al. 2014 (paper) | {paper_valid} | {paper_test} |",
        f"| TensorFlow PTB tutorial | {tf_valid} | {tf_test} |",
        f"| **ours** (after epoch {summary['steps'] / spe:.3g}) | **{summary['eval/ppl']:.1f}** | **{test:.1f}** |",
        "",
        f"Acceptance bound (test ppl <= 5% above the paper's {paper_test}): {bound:.1f} -> "
        f"**{'met' if test <= bound else 'NOT met'}** ({(test / paper_test - 1) * 100:+.1f}% vs the paper, "
        f"{(test / tf_test - 1) * 100:+.1f}% vs the TensorFlow tutorial).",
        "",
        f"Wall time on this machine: {summary['wall_time_s'] / 60:.1f} min for {summary['steps']:,} steps "
        f"({summary['steps'] / spe:.3g} epochs), evaluation included; training throughput "
        f"{sum(rates) / len(rates):,.0f} tokens/s on average (min {min(rates):,.0f}, max {max(rates):,.0f}; the "
        "machine was shared with other work for part of the run, so these are lower bounds)."
        + (f" lb-train vs a bare PyTorch loop on the same model: see `{bench.relative_to(REPO)}`." if bench.exists()
           else ""),
        "",
        "Valid/test perplexity after each epoch (the whole splits, each scored as one stream):",
        "",
        "| epoch | valid ppl | test ppl |",
        "|---|---|---|",
        *rows,
        "",
        "Loss convention: the token losses summed over the BPTT window and averaged over the 20 streams (as "
        "Zaremba's code and the TensorFlow tutorial), which the recipe's lr 1 and clip 5 refer to; perplexity is "
        "exp of the per-token mean. Schedule: lr 1 for epochs 1-4, then halved every epoch (the tutorial's "
        "max_epoch=4).",
        "",
    ])
    copy_records({run: Path(".")}, args.out, RECORDS)
    atomic_write_text(args.out / "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
