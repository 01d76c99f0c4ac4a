"""Trainer benchmark -> results/bench/trainer.md. Ratios measured in one process, interleaved (A B A B ...)
so that machine noise hits both sides alike.

1. lb-train's training loop against a bare PyTorch loop: same model, data, micro-batch, fused AdamW
   (goal >= 0.95);
2. lb-train at batch = micro-batch against batch = 64 x micro-batch, accumulated (goal >= 0.97);
3. BERT-tiny masked-LM with the head at masked positions only against stock BertForMaskedLM (head on
   every position), bare loops, sequence length 128, micro-batch 32.

    python scripts/bench_trainer.py [--rounds 2] [--out results/bench/trainer.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.config import compose  # noqa: E402
from largebatch.data import build_mlm_data  # noqa: E402
from largebatch.models.bert import build_bert  # noqa: E402
from largebatch.runfolder import read_metrics  # noqa: E402
from largebatch.tracking import environment  # noqa: E402
from largebatch.train import train  # noqa: E402

MICRO = 64
SEQ = 64


def trainer_samples_per_s(batch: int, steps: int, workdir: Path) -> float:
    """lb-train's own throughput (its metrics exclude evaluation), first log window dropped as warm-up."""
    probe = compose([])
    n = len(build_mlm_data(probe.data, probe.model.vocab_size, SEQ, 0).train)
    epochs = steps * batch / (n - n % batch)
    log_every = max(1, steps // 4)
    cfg = compose([f"batch={batch}", f"micro_batch={MICRO}", f"epochs={epochs}", "optimizer=adamw",
                   "progress=false", "save_checkpoint=false", "eval_every_epochs=1000", "eval_max_batches=1",
                   f"log_every={log_every}", "schedule.warmup_epochs=0"])
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    train(cfg, run_dir)
    windows = read_metrics(run_dir)
    rates = [m["samples_per_s"] for m in windows if "samples_per_s" in m][1:]
    return statistics.mean(rates)


def bare_samples_per_s(steps: int, *, stock_head: bool = False, seq_len: int = SEQ, micro: int = MICRO) -> float:
    """The loop a user would write by hand: DataLoader, forward, backward, fused AdamW."""
    cfg = compose([])
    data = build_mlm_data(cfg.data, cfg.model.vocab_size, seq_len, 0)
    torch.manual_seed(0)
    model = build_bert(cfg.model.size, data.vocab_size, cfg.model.dropout, max(512, seq_len))
    net = model.mlm if stock_head else model
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    loader = torch.utils.data.DataLoader(data.train, batch_size=micro, shuffle=True)
    it = iter(loader)
    for i in range(steps + 3):
        if i == 3:  # warm-up excluded
            start = time.perf_counter()
        batch = next(it)
        if stock_head:
            loss = net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        else:
            out = net(**batch)
            loss = out["loss_sum"] / out["count"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * micro / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="micro-batches per measurement")
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "trainer.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp())
    m = {k: [] for k in ("trainer", "bare", "acc1", "acc64", "ours128", "stock128")}
    started = time.perf_counter()
    for r in range(args.rounds):
        m["trainer"].append(trainer_samples_per_s(MICRO, args.steps, workdir))
        m["bare"].append(bare_samples_per_s(args.steps))
        m["acc1"].append(trainer_samples_per_s(MICRO, args.steps, workdir))
        m["acc64"].append(trainer_samples_per_s(64 * MICRO, max(2, args.steps // 64 * 2), workdir))
        m["stock128"].append(bare_samples_per_s(args.steps // 2, stock_head=True, seq_len=128, micro=32))
        m["ours128"].append(bare_samples_per_s(args.steps // 2, seq_len=128, micro=32))
        print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.1f}" for k, v in m.items()), flush=True)
    med = {k: statistics.median(v) for k, v in m.items()}
    env = environment()
    rows = [
        ("lb-train vs bare PyTorch loop (samples/s)", med["trainer"], med["bare"], ">= 0.95"),
        ("batch 64x micro (accumulated) vs batch = micro (samples/s)", med["acc64"], med["acc1"], ">= 0.97"),
        ("masked-position MLM head vs stock BertForMaskedLM, seq 128, micro 32 (tokens/s)",
         med["ours128"] * 128, med["stock128"] * 128, "report"),
    ]
    lines = [
        "# Trainer benchmark", "",
        f"Command: `python scripts/bench_trainer.py --rounds {args.rounds} --steps {args.steps}` "
        f"({time.perf_counter() - started:.0f} s). Model BERT-tiny, bundled corpus, sequence length {SEQ}, "
        f"micro-batch {MICRO}, AdamW (fused), fp32, 2 threads; medians over {args.rounds} interleaved rounds.", "",
        "| comparison | ours | reference | ratio | goal |", "|---|---|---|---|---|",
        *[f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.3f} | {goal} |" for name, a, b, goal in rows], "",
        "Every round: " + "; ".join(f"{k} " + "/".join(f"{x:.1f}" for x in v) for k, v in m.items()), "",
        f"Machine: {env['hardware'].get('cpu')} ({env['hardware']['cpu_count']} cores), torch "
        f"{env['versions'].get('torch')}, transformers {env['versions'].get('transformers')}, "
        f"accelerate {env['versions'].get('accelerate')}; git {env['git']['sha']} (dirty: {env['git']['dirty']}).",
        f"Load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs slow both sides of each ratio alike).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
