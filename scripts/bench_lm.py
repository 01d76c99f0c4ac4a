"""PTB LSTM LM benchmark -> results/bench/lm.md: lb-train's tokens/s against a bare PyTorch loop on the same
model (Zaremba's small 2x200, batch 20, BPTT 20, SGD, clip 5), measured in one process, interleaved
(A B A B ...) so machine noise hits both sides alike. The bare loop is what a user writes by hand:
stateful windows, the loss summed over the window / streams, clip_grad_norm_, SGD.

    python scripts/bench_lm.py [--rounds 3] [--steps 300] [--out results/bench/lm.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from largebatch.config import compose  # noqa: E402
from largebatch.data.ptb import batchify  # noqa: E402
from largebatch.runfolder import read_metrics  # noqa: E402
from largebatch.tasks import build_task  # noqa: E402
from largebatch.tracking import environment  # noqa: E402
from largebatch.train import train  # noqa: E402

RECIPE = ["experiment=ptb_zaremba_small", "progress=false", "save_checkpoint=false"]


def trainer_tokens_per_s(steps: int, workdir: Path) -> float:
    """lb-train's own figure (its metrics exclude evaluation); the first log window is dropped as warm-up."""
    cfg = compose([*RECIPE, f"epochs={steps / 2323}", f"log_every={steps // 5}", "data.max_tokens=null"])
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    train(cfg, run_dir)
    windows = read_metrics(run_dir)
    return statistics.mean([m["tokens_per_s"] for m in windows if "tokens_per_s" in m][1:])


def bare_tokens_per_s(steps: int) -> float:
    cfg = compose(RECIPE)
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model()
    streams, window = batchify(task.corpus.train, cfg.batch), task.shape.bptt
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    state, started, warmup = None, None, steps // 5
    for t in range(steps):
        if t == warmup:
            started = time.perf_counter()
        chunk = streams[:, t * window: (t + 1) * window + 1]
        out = model(chunk[:, :-1], chunk[:, 1:], state)
        state = tuple(s.detach() for s in out["state"])
        opt.zero_grad(set_to_none=True)
        (out["loss_sum"] / cfg.batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    return (steps - warmup) * cfg.batch * window / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench" / "lm.md")
    args = parser.parse_args()
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.rounds):
            bare.append(bare_tokens_per_s(args.steps))
            ours.append(trainer_tokens_per_s(args.steps, Path(workdir)))
    ratio = statistics.median(o / b for o, b in zip(ours, bare))
    env = environment()
    lines = [
        "# PTB LSTM LM: lb-train vs a bare PyTorch loop",
        "",
        f"Command: `python scripts/bench_lm.py --rounds {args.rounds} --steps {args.steps}`; git {env['git']['sha']}"
        f"{' (dirty)' if env['git']['dirty'] else ''}; torch {env['versions'].get('torch')}; "
        f"{env['hardware'].get('cpu')}, {env['hardware']['cpu_count']} cores, {torch.get_num_threads()} torch threads.",
        "Model: Zaremba small (2x200, vocab 10k), batch 20 streams, BPTT 20, SGD lr 1, clip 5; "
        f"{args.steps} steps a measurement, the first fifth dropped as warm-up; rounds interleaved.",
        "",
        "| round | bare loop tokens/s | lb-train tokens/s | ratio |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {b:,.0f} | {o:,.0f} | {o / b:.3f} |" for i, (b, o) in enumerate(zip(bare, ours))],
        "",
        f"Median ratio lb-train / bare: **{ratio:.3f}**. One epoch of PTB (929,589 tokens) at the bare loop's median "
        f"rate: {929_589 / statistics.median(bare) / 60:.1f} min.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
