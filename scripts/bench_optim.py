"""Optimizer step time on the BERT-base parameter set (110M), CPU, one process: largebatch.optim's LAMB
(every implementation), LARS and AdamW beside torch AdamW (fused, foreach), torch SGD momentum, timm
Lamb/Lars and torch_optimizer Lamb. Writes results/bench/optim.md.

    .venv/bin/python scripts/bench_optim.py [--threads 2] [--steps 25] [--fresh-build]

Every optimizer owns its own parameters and state but they all share one set of random gradients (no
optimizer here writes to p.grad). Steps are interleaved round-robin so that machine noise (other jobs,
frequency changes) hits all of them alike; the table gives the median and the 20-80% range.
``--fresh-build`` builds the C++ kernel in a temporary extension directory to time a cold build.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


BERT_SIZES = {"base": (768, 12, 3072), "large": (1024, 24, 4096)}  # hidden, layers, intermediate


def bert_named_shapes(size: str = "base") -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of BertForMaskedLM (vocab 30522, tied decoder weight counted once)."""
    h, n_layers, f = BERT_SIZES[size]
    try:
        from transformers import BertConfig, BertForMaskedLM

        with torch.device("meta"):
            model = BertForMaskedLM(BertConfig(hidden_size=h, num_hidden_layers=n_layers, intermediate_size=f,
                                               num_attention_heads=h // 64))
        return [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    except ImportError:  # the same list by hand
        emb = "bert.embeddings."
        shapes = [(emb + "word_embeddings.weight", (30522, h)), (emb + "position_embeddings.weight", (512, h)),
                  (emb + "token_type_embeddings.weight", (2, h)), (emb + "LayerNorm.weight", (h,)),
                  (emb + "LayerNorm.bias", (h,))]
        for i in range(n_layers):
            pre = f"bert.encoder.layer.{i}."
            for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
                shapes += [(pre + m + ".weight", (h, h)), (pre + m + ".bias", (h,))]
            shapes += [(pre + "attention.output.LayerNorm.weight", (h,)), (pre + "attention.output.LayerNorm.bias", (h,)),
                       (pre + "intermediate.dense.weight", (f, h)), (pre + "intermediate.dense.bias", (f,)),
                       (pre + "output.dense.weight", (h, f)), (pre + "output.dense.bias", (h,)),
                       (pre + "output.LayerNorm.weight", (h,)), (pre + "output.LayerNorm.bias", (h,))]
        head = "cls.predictions."
        return shapes + [(head + "bias", (30522,)), (head + "transform.dense.weight", (h, h)),
                         (head + "transform.dense.bias", (h,)), (head + "transform.LayerNorm.weight", (h,)),
                         (head + "transform.LayerNorm.bias", (h,))]


def excluded(name: str) -> bool:
    return "bias" in name or "LayerNorm" in name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="timed steps per optimizer (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fresh-build", action="store_true", help="time a cold build of the C++ kernel")
    ap.add_argument("--only", default="", help="comma-separated subset of rows (debugging)")
    ap.add_argument("--out", default=str(ROOT / "results/bench/optim.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fresh_build:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="lb_ext_")

    from largebatch.optim import _cpp, create_optimizer

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    kernel = _cpp.load()
    build_s = time.perf_counter() - t0
    print(f"C++ kernel: {'ok' if kernel else 'FAILED: ' + str(_cpp.failure())} in {build_s:.1f} s "
          f"({'fresh build' if args.fresh_build else 'from the extension cache if present'})", flush=True)

    shapes = bert_named_shapes("base")
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for _, s in shapes]
    init = [torch.randn(s, generator=gen) * 0.02 for _, s in shapes]
    wd = 0.01

    def fresh_named():
        named = []
        for (n, _), x0, g in zip(shapes, init, grads):
            p = torch.nn.Parameter(x0.clone())
            p.grad = g
            named.append((n, p))
        return named

    def two_groups(named):
        return [{"params": [p for n, p in named if not excluded(n)], "weight_decay": wd},
                {"params": [p for n, p in named if excluded(n)], "weight_decay": 0.0}]

    builders = {
        "torch AdamW fused": lambda nm: torch.optim.AdamW(two_groups(nm), lr=1e-3, fused=True),
        "torch AdamW foreach": lambda nm: torch.optim.AdamW(two_groups(nm), lr=1e-3, foreach=True),
        "ours adamw (auto)": lambda nm: create_optimizer(nm, "adamw", 1e-3, wd),
        "ours lamb cpp": lambda nm: create_optimizer(nm, "lamb", 1e-3, wd, implementation="cpp"),
        "ours lamb foreach": lambda nm: create_optimizer(nm, "lamb", 1e-3, wd, implementation="foreach"),
        "ours nvlamb cpp": lambda nm: create_optimizer(nm, "nvlamb", 1e-3, wd, implementation="cpp"),
        "torch SGD momentum foreach": lambda nm: torch.optim.SGD(two_groups(nm), lr=0.1, momentum=0.9,
                                                                 foreach=True),
        "ours lars cpp": lambda nm: create_optimizer(nm, "lars", 0.1, wd, implementation="cpp"),
        "ours lars foreach": lambda nm: create_optimizer(nm, "lars", 0.1, wd, implementation="foreach"),
    }
    try:
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, fused=True)
        builders["torch SGD momentum fused"] = lambda nm: torch.optim.SGD(two_groups(nm), lr=0.1, momentum=0.9,
                                                                         fused=True)
    except (RuntimeError, ValueError) as exc:
        print(f"torch SGD fused unavailable on CPU: {exc}")
    try:
        import timm.optim

        # max_grad_norm=None: timm's default pre-clip (NVLAMB) would add a pass that plain LAMB does not have.
        builders["timm Lamb"] = lambda nm: timm.optim.Lamb(two_groups(nm), lr=1e-3, max_grad_norm=None)
        builders["timm Lars"] = lambda nm: timm.optim.Lars(two_groups(nm), lr=0.1, momentum=0.9)
    except ImportError:
        print("timm not installed: skipped")
    try:
        import torch_optimizer

        builders["torch_optimizer Lamb"] = lambda nm: torch_optimizer.Lamb(
            [p for _, p in nm], lr=1e-3, weight_decay=wd)
    except ImportError:
        print("torch_optimizer not installed: skipped")
    if args.only:
        keep = {"torch AdamW fused", "torch SGD momentum foreach", *args.only.split(",")}
        builders = {k: v for k, v in builders.items() if k in keep}

    opts = {}
    for name, build in builders.items():
        opts[name] = build(fresh_named())
        for _ in range(args.warmup):  # state allocation, first-call overheads
            opts[name].step()
    times = {name: [] for name in opts}
    for _ in range(args.steps):
        for name, opt in opts.items():
            t = time.perf_counter()
            opt.step()
            times[name].append((time.perf_counter() - t) * 1e3)
    load_after = os.getloadavg()

    # Ratios by median and by the fastest step: on a shared machine the minimum is the step that other
    # jobs disturbed least, closest to what the code can do on an idle machine.
    med = {n: statistics.median(ts) for n, ts in times.items()}
    best = {n: min(ts) for n, ts in times.items()}
    sgd_med = min(v for n, v in med.items() if n.startswith("torch SGD"))
    sgd_best = min(v for n, v in best.items() if n.startswith("torch SGD"))
    adamw_med, adamw_best = med["torch AdamW fused"], best["torch AdamW fused"]
    rows = []
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        rows.append(f"| {n} | {med[n]:.1f} | {q[0]:.1f}-{q[3]:.1f} | {best[n]:.1f} | "
                    f"{med[n] / adamw_med:.2f} / {best[n] / adamw_best:.2f} | "
                    f"{med[n] / sgd_med:.2f} / {best[n] / sgd_best:.2f} |")
        print(rows[-1], flush=True)
    write_report(args, rows, n_params, len(shapes), build_s, kernel is not None, load_before, load_after)


def _cmd(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
    except OSError:
        return "?"


def write_report(args, rows, n_params, n_tensors, build_s, kernel_ok, load_before, load_after) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cmd(["lscpu"]).splitlines() if ln.startswith("Model name")), "?")
    sha = _cmd(["git", "rev-parse", "--short", "HEAD"])
    dirty = " (dirty tree)" if _cmd(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    text = f"""# Optimizer step time, BERT-base parameter set, CPU

Produced by `scripts/bench_optim.py`; do not edit by hand.

- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`
- date: {datetime.datetime.now().isoformat(timespec='seconds')}
- machine: {cpu}, {os.cpu_count()} logical CPUs, torch.set_num_threads({args.threads}); {platform.platform()}
- load average (1/5/15 min) before: {' '.join(f'{x:.2f}' for x in load_before)}, after: \
{' '.join(f'{x:.2f}' for x in load_after)} (other jobs on the machine inflate every row alike)
- torch {torch.__version__}, python {platform.python_version()}, git {sha}{dirty}
- parameters: {n_params:,} in {n_tensors} tensors (BertForMaskedLM(BertConfig()), decoder weight tied),
  fp32; decay 0.01 on all but biases and LayerNorm weights (which get no trust ratio)
- C++ kernel: {'built/loaded' if kernel_ok else 'FAILED'} in {build_s:.1f} s \
({'cold build in a fresh extension dir' if args.fresh_build else 'cached build if one existed'})
- {args.steps} timed steps per optimizer after {args.warmup} warm-up steps, interleaved round-robin

Ratios are median/median and min/min; "torch SGD" is the faster of torch's SGD paths (by the same statistic).

| optimizer | median ms/step | 20-80% range | min ms/step | ratio to torch AdamW fused (median / min) | ratio to torch SGD momentum (median / min) |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
