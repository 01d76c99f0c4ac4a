"""GPU check of largebatch.optim (needs CUDA; run on a GPU machine):

1. numerics: the CUDA path (foreach) of every LAMB/LARS registry entry matches the CPU path (the C++
   kernel where it builds, else foreach) over 20 steps of identical gradients, rel. error <= 1e-5;
2. speed: ms/step of our LAMB and LARS (foreach on CUDA) beside torch AdamW (fused, foreach) and SGD
   momentum on the BERT-base and BERT-large parameter sets (CUDA events, median of 50 after warm-up).

    python scripts/device/gpu_optim_check.py [--out results/bench/gpu_optim.md]

Without CUDA it stops at once with a message and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_optim import bert_named_shapes, excluded  # noqa: E402

from largebatch.optim import OPTIMIZERS, create_optimizer  # noqa: E402

VARIANT_LR = {"lars": 0.01, "larc": 0.01, "lars_paper": 0.005}


def check_numerics(steps: int = 20) -> list[str]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    shapes = [(f"layer{i}.weight", (64, 48)) for i in range(3)] + [("layer0.bias", (64,)), ("norm.weight", (48,))]
    init = [torch.randn(s, generator=gen) for _, s in shapes]
    grads = [[torch.randn(s, generator=gen) for _, s in shapes] for _ in range(steps)]
    for name, spec in OPTIMIZERS.items():
        if not spec.adapts:
            continue
        finals = {}
        for device in ("cpu", "cuda"):
            named = [(n, torch.nn.Parameter(x.clone().to(device))) for (n, _), x in zip(shapes, init)]
            opt = create_optimizer(named, name, VARIANT_LR.get(name, 0.01), weight_decay=0.01,
                                   trust_coefficient=0.02 if name in ("lars", "larc") else None)
            for step_grads in grads:
                for (_, p), g in zip(named, step_grads):
                    p.grad = g.to(device)
                opt.step()
            finals[device] = ([p.detach().cpu() for _, p in named], opt.last_path)
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(finals["cuda"][0], finals["cpu"][0]))
        verdict = "ok" if err <= 1e-5 else "MISMATCH"
        rows.append(f"| {name} | {finals['cpu'][1]} | {finals['cuda'][1]} | {err:.2e} | {verdict} |")
        print(rows[-1], flush=True)
    return rows


def time_steps(opt, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_speed(size: str, steps: int) -> list[str]:
    shapes = bert_named_shapes(size)
    n_params = sum(torch.Size(s).numel() for _, s in shapes)
    grads = [torch.randn(s, device="cuda") * 1e-3 for _, s in shapes]

    def named():
        out = []
        for (n, s), g in zip(shapes, grads):
            p = torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02)
            p.grad = g
            out.append((n, p))
        return out

    def groups(nm):
        return [{"params": [p for n, p in nm if not excluded(n)], "weight_decay": 0.01},
                {"params": [p for n, p in nm if excluded(n)], "weight_decay": 0.0}]

    builders = {
        "torch AdamW fused": lambda nm: torch.optim.AdamW(groups(nm), lr=1e-3, fused=True),
        "torch AdamW foreach": lambda nm: torch.optim.AdamW(groups(nm), lr=1e-3, foreach=True),
        "torch SGD momentum fused": lambda nm: torch.optim.SGD(groups(nm), lr=0.1, momentum=0.9, fused=True),
        "ours lamb (auto)": lambda nm: create_optimizer(nm, "lamb", 1e-3, 0.01),
        "ours nvlamb (auto)": lambda nm: create_optimizer(nm, "nvlamb", 1e-3, 0.01),
        "ours lars (auto)": lambda nm: create_optimizer(nm, "lars", 0.1, 0.01),
    }
    med = {}
    for name, build in builders.items():  # one at a time: BERT-large states do not all fit at once
        opt = build(named())
        med[name] = time_steps(opt, steps)
        del opt
        torch.cuda.empty_cache()
    rows = []
    for name, ms in med.items():
        rows.append(f"| {size} ({n_params / 1e6:.0f}M) | {name} | {ms:.2f} | {ms / med['torch AdamW fused']:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "results/bench/gpu_optim.md"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_optim_check: CUDA is not available on this machine (torch.cuda.is_available() is False); "
              "run it on a GPU machine.", file=sys.stderr)
        raise SystemExit(2)
    numerics = check_numerics()
    speed = check_speed("base", args.steps) + check_speed("large", args.steps)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    text = f"""# largebatch.optim on GPU

Produced by `scripts/device/gpu_optim_check.py`; do not edit by hand.

- command: `python {' '.join(sys.argv)}`
- date: {datetime.datetime.now().isoformat(timespec='seconds')}
- device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, git {sha.strip()}

## CUDA path vs CPU path (20 steps, identical gradients)

| optimizer | CPU path | CUDA path | max rel. error | verdict |
|---|---|---|---|---|
""" + "\n".join(numerics) + f"""

## Step time (median of {args.steps} after 5 warm-up steps, CUDA events)

| parameter set | optimizer | ms/step | ratio to torch AdamW fused |
|---|---|---|---|
""" + "\n".join(speed) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if any("MISMATCH" in r for r in numerics):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
