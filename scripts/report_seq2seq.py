"""Seq2seq reference run -> results/seq2seq/: the run's records, its test translations and a README.

    python scripts/report_seq2seq.py RUN_DIR [--out results/seq2seq]

RUN_DIR is a finished `lb-train model=seq2seq data=verses` run. Every number in the README is read from
the run's records; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.fileio import atomic_write_text  # noqa: E402
from largebatch.report.runs import user_command  # noqa: E402
from largebatch.runfolder import (  # noqa: E402
    ENV,
    EXAMPLES,
    RECORDS,
    SUMMARY,
    copy_records,
    read_config,
    read_json,
    read_metrics,
    read_plan,
    status_of,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "seq2seq")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence on how the run was made that its records cannot say (repeatable)")
    args = parser.parse_args()
    run = args.run_dir
    status = status_of(run)
    if status != "finished":
        raise SystemExit(f"error: {run} is not a finished run (status {status})")

    cfg = read_config(run)
    env, s, lines = read_json(run / ENV), read_json(run / SUMMARY), read_metrics(run)
    evals = [m for m in lines if "eval/bleu" in m]
    rates = [m["samples_per_s"] for m in lines if "samples_per_s" in m]
    plan = read_plan(run)[0]
    spe = plan["steps_per_epoch"]
    m, d = cfg["model"], cfg["data"]
    hw = env["hardware"]

    text = "\n".join([
        f"# Seq2seq: {d['src_lang']} -> {d['tgt_lang']} Bible verses (KJV -> Reina-Valera 1909), "
        f"{m['encoder_layers']}+{m['decoder_layers']} x {m['hidden']} GNMT-style LSTM, batch {cfg['batch']}",
        "",
        "```",
        f"OMP_NUM_THREADS={hw['torch_threads']} {user_command(env['command'])}",
        "```",
        "",
        f"git {env['git']['sha'][:7]}{' (with uncommitted changes in the tree)' if env['git']['dirty'] else ''}; "
        f"torch {env['versions'].get('torch')}, tokenizers {env['versions'].get('tokenizers')}; "
        f"{hw.get('cpu')}, {hw['torch_threads']} torch thread(s) of {hw['cpu_count']} cores. Files: `config.yaml` "
        "(the resolved config), `plan.json`, `env.json`, `metrics.jsonl`, `summary.json`, `status.json`, "
        "`examples.md`, `translations/test.hyp` (every test hypothesis, in order).",
        "",
        f"Setting: {plan['train_samples']:,} training pairs (verses with a side over {d['max_len']} BPE tokens "
        f"dropped), a joint BPE vocabulary of {d['vocab_size']:,} tokens, {m['attention']} attention, dropout "
        f"{m['dropout']}, loss per {m['normalise_by'][:-1]} (tensorflow/nmt's), {cfg['optimizer']['name']} lr "
        f"{cfg['optimizer']['lr']:g} ({cfg['schedule']['name']} schedule, warmup {cfg['schedule']['warmup_epochs']} "
        f"epochs), gradient norm clipped at {cfg['optimizer']['grad_clip_norm']}, {plan['epochs']:g} epochs "
        f"({s['steps']:,} steps of {cfg['batch']}).",
        "",
        f"## Result (test split: {s['test/sentences']:,} verses of whole held-out chapters)",
        "",
        "| | BLEU | chrF | token perplexity |",
        "|---|---|---|---|",
        f"| copy the source (the baseline: what \"0\" looks like) | {s['test/copy_source/bleu']:.2f} | "
        f"{s['test/copy_source/chrf']:.2f} | - |",
        f"| **ours** ({s['test/decoder']}) | **{s['test/bleu']:.2f}** | **{s['test/chrf']:.2f}** | "
        f"{s['test/ppl']:.2f} |",
        "",
        "No published number exists for KJV -> Reina-Valera verse translation: this run reproduces nothing; it is "
        "the base rung LEGW's GNMT ladder starts from on this machine, and the copy baseline says what \"0\" looks "
        "like on this pair.",
        "",
        f"Wall time: **{s['wall_time_s'] / 60:.1f} minutes** of training with {len(evals)} evaluations "
        f"(the final beam-search decode of the test split is not included); {sum(rates) / len(rates):.1f} "
        f"training pairs/s on average over the logged windows ({min(rates):.1f}-{max(rates):.1f}).",
        "",
        f"Valid split ({s['eval/sentences']:,} verses) after each evaluation, greedy decoding:",
        "",
        "| epoch | valid loss | valid ppl | valid BLEU | valid chrF |",
        "|---|---|---|---|---|",
        *(f"| {e['step'] / spe:.2f} | {e['eval/loss']:.3f} | {e['eval/ppl']:.2f} | {e['eval/bleu']:.2f} | "
          f"{e['eval/chrf']:.2f} |" for e in evals),
        "",
        "Examples (the first test verses): `examples.md`.",
        "",
        *(["## Notes", "", *(f"- {note}" for note in args.note), ""] if args.note else []),
    ])
    copy_records({run: Path(".")}, args.out, (*RECORDS, EXAMPLES))
    (args.out / "translations").mkdir(exist_ok=True)
    shutil.copy(run / "translations" / "test.hyp", args.out / "translations" / "test.hyp")
    atomic_write_text(args.out / "README.md", text)
    print(text)


if __name__ == "__main__":
    main()
