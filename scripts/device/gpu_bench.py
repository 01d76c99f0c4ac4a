"""GPU benchmark of the speed work (fused LAMB/LARS, the data path, MFU) -> results/bench/gpu.md.

Sections, each written to the report as soon as it is measured (a timeout leaves the finished ones):

1. numerics: every LAMB/LARS registry entry, the Triton path on the GPU against the CPU path (C++ kernel
   or foreach) over 10 steps of identical gradients (max rel. error <= 1e-5), and bf16 params (float32
   state) against foreach on the GPU;
2. optimizer step time on the BERT-base and BERT-large parameter sets: ours (triton, foreach), torch
   AdamW (fused), torch SGD momentum (fused), timm Lamb; goals: LAMB <= 1.5x fused AdamW, LARS <= 1.5x
   fused SGD momentum (BERT-large);
3. bare model: BERT-base and BERT-large MLM, seq 128, micro-batch 256 x 8, bf16, synthetic masked batch
   (fixed count per sequence), LAMB (triton); tokens/s, TFLOP/s and MFU, eager and compiled;
4. ``lb-train`` with the defaults (data.num_workers=auto, the bundled corpus) on the same batch; goal:
   >= 95% of the bare model's eager tokens/s with the same (bundled corpus) vocabulary.

Prepare here (CPU), then run there (the GPU machine is offline and lacks hydra/omegaconf and the data
packages: the wheels script installs them)::

    .venv/bin/python scripts/device/gpu_bench.py --prepare   # after fetching the hydra/omegaconf/antlr4 wheels into .whl/
    # carry .whl and the cache folder --prepare names; on the GPU machine:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:$PWD python3 scripts/device/gpu_bench.py --out $OUT/gpu.md

``--dry-run`` runs every section on tiny shapes on the CPU (what the tests do), so the GPU run cannot
fail for a silly reason. Exit status 1 when a numerics check fails.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from largebatch.optim import OPTIMIZERS, create_optimizer  # noqa: E402

LB_TRAIN = ["model.size=base", "data.seq_len=128", "precision=bf16", "batch=2048", "micro_batch=256",
            "optimizer=lamb", "save_checkpoint=false", "progress=false", "eval_max_batches=1",
            "eval_every_epochs=100", "log_every=2"]  # the command, without records it does not need
VARIANT_LR = {"lars": 0.01, "larc": 0.01, "lars_mlperf": 0.01, "lars_paper": 0.005}


class Report:
    """The markdown file, rewritten after every section."""

    def __init__(self, path: Path, header: str):
        self.path, self.parts = path, [header]

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.parts) + "\n")
        print(text, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int) -> float:
    """Median wall ms of ``fn`` after warm-up (synchronised, so asynchronous launches are counted)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bert_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    from largebatch.models.bert import build_bert

    with torch.device("meta"):
        model = build_bert(size, 30522, 0.0, 512)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


# ------------------------------------------------------------------------------------------- numerics
def check_numerics(device, steps: int = 10) -> tuple[list[str], bool]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(f"layer{i}.weight", (96, 80)) for i in range(3)] + [("layer0.bias", (96,)), ("norm.weight", (80,))]
    init = [torch.randn(s, generator=gen) for _, s in shapes]
    grads = [[torch.randn(s, generator=gen) for _, s in shapes] for _ in range(steps)]
    rows, ok = [], True
    for name, spec in OPTIMIZERS.items():
        if not spec.adapts:
            continue
        finals = {}
        for where in ("cpu", device.type):
            named = [(n, torch.nn.Parameter(x.clone().to(where))) for (n, _), x in zip(shapes, init)]
            opt = create_optimizer(named, name, VARIANT_LR.get(name, 0.01), weight_decay=0.01,
                                   trust_coefficient=0.02 if name in ("lars", "larc", "lars_mlperf") else None)
            for step_grads in grads:
                for (_, p), g in zip(named, step_grads):
                    p.grad = g.to(where)
                opt.step()
            finals[where] = ([p.detach().cpu() for _, p in named], opt.last_path)
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(finals[device.type][0], finals["cpu"][0]))
        good = err <= 1e-5
        ok &= good
        rows.append(f"| {name} | fp32 | {finals['cpu'][1]} | {finals[device.type][1]} | {err:.2e} | "
                    f"{'ok' if good else 'MISMATCH'} |")
    for name in ("lamb", "lars", "lars_paper"):  # bf16 params, float32 state: kernel vs foreach, same device
        finals = {}
        for impl in ("auto", "foreach"):
            named = [(n, torch.nn.Parameter(x.clone().to(device, torch.bfloat16))) for (n, _), x in zip(shapes, init)]
            opt = create_optimizer(named, name, VARIANT_LR.get(name, 0.01), weight_decay=0.01, implementation=impl)
            for step_grads in grads:
                for (_, p), g in zip(named, step_grads):
                    p.grad = g.to(device, torch.bfloat16)
                opt.step()
            finals[impl] = ([p.detach().float().cpu() for _, p in named], opt.last_path)
        agree = min(float((a == b).float().mean()) for a, b in zip(finals["auto"][0], finals["foreach"][0]))
        good = agree >= 0.98
        ok &= good
        rows.append(f"| {name} | bf16 | {finals['foreach'][1]} | {finals['auto'][1]} | {1 - agree:.2%} elements "
                    f"differ | {'ok' if good else 'MISMATCH'} |")
    return rows, ok


# ------------------------------------------------------------------------------------------- optimizer speed
def optimizer_speed(size: str, device, steps: int) -> list[str]:
    shapes = bert_shapes(size)
    n_params = sum(torch.Size(s).numel() for _, s in shapes)

    def named():
        gen = torch.Generator(device=device).manual_seed(0)
        out = []
        for n, s in shapes:
            p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
            out.append((n, p))
        return out

    def groups(nm):
        excluded = [p for n, p in nm if "bias" in n or "LayerNorm" in n]
        rest = [p for n, p in nm if not ("bias" in n or "LayerNorm" in n)]
        return [{"params": rest, "weight_decay": 0.01}, {"params": excluded, "weight_decay": 0.0}]

    fused = device.type == "cuda"
    builders = {
        "torch AdamW (fused)": lambda nm: torch.optim.AdamW(groups(nm), lr=1e-3, fused=fused, foreach=not fused),
        "torch SGD momentum (fused)": lambda nm: torch.optim.SGD(groups(nm), lr=0.1, momentum=0.9, fused=fused,
                                                                 foreach=not fused),
        "ours lamb (auto)": lambda nm: create_optimizer(nm, "lamb", 1e-3, 0.01),
        "ours lamb (foreach)": lambda nm: create_optimizer(nm, "lamb", 1e-3, 0.01, implementation="foreach"),
        "ours nvlamb (auto)": lambda nm: create_optimizer(nm, "nvlamb", 1e-3, 0.01),
        "ours lars (auto)": lambda nm: create_optimizer(nm, "lars", 0.1, 0.01),
        "ours lars (foreach)": lambda nm: create_optimizer(nm, "lars", 0.1, 0.01, implementation="foreach"),
    }
    try:
        from timm.optim import Lamb as TimmLamb

        builders["timm Lamb"] = lambda nm: TimmLamb(groups(nm), lr=1e-3)
    except ImportError:
        pass
    ms, paths = {}, {}
    for name, build in builders.items():  # one at a time: BERT-large's states do not all fit at once
        opt = build(named())
        ms[name] = timed(opt.step, device, steps if "timm" not in name else max(2, steps // 5), warmup=3)
        paths[name] = getattr(opt, "last_path", "")
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    adamw, sgd = ms["torch AdamW (fused)"], ms["torch SGD momentum (fused)"]
    rows = []
    for name, t in ms.items():
        goal = ""
        if name == "ours lamb (auto)":
            goal = f"{'met' if t <= 1.5 * adamw else 'NOT met'} (<= 1.5x AdamW)"
        if name == "ours lars (auto)":
            goal = f"{'met' if t <= 1.5 * sgd else 'NOT met'} (<= 1.5x SGD: {t / sgd:.2f}x)"
        rows.append(f"| {size} ({n_params / 1e6:.0f}M) | {name} | {paths[name]} | {t:.2f} | {t / adamw:.2f} | {goal} |")
    return rows


# ------------------------------------------------------------------------------------------- bare model
def synthetic_batch(micro: int, seq_len: int, vocab: int, device) -> dict:
    from largebatch.data.mlm import MaskedLMDataset

    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(5, vocab, (micro, seq_len), generator=gen, dtype=torch.int32)
    seqs[:, 0], seqs[:, -1] = 2, 3
    ds = MaskedLMDataset(seqs, mask_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=vocab)
    return {k: v.to(device) for k, v in ds.__getitems__(list(range(micro))).items()}


def bare_model(size: str, device, micro: int, accumulation: int, seq_len: int, steps: int, compile_model: bool,
               vocab: int) -> dict:
    """Training steps of the model alone (no data loader): forward/backward of ``accumulation`` micro-batches
    of one synthetic masked batch under bf16 autocast, then a LAMB step."""
    from largebatch.data.mlm import masked_count
    from largebatch.flops import bert_flops_per_sample, mfu_metrics
    from largebatch.models.bert import build_bert

    torch.manual_seed(0)
    model = build_bert(size, vocab, 0.1, 512).to(device)
    opt = create_optimizer(model, "lamb", 1e-4, 0.01)
    runner = torch.compile(model) if compile_model else model
    batch = synthetic_batch(micro, seq_len, vocab, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        for _ in range(accumulation):
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                out = runner(**batch)
            (out["loss_sum"] / (out["count"] * accumulation)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    started = time.perf_counter()
    step()  # compiles, when compiling
    sync(device)
    first_s = time.perf_counter() - started
    ms = timed(step, device, steps, warmup=1)
    samples_per_s = micro * accumulation / (ms / 1e3)
    flops = bert_flops_per_sample(model, seq_len, masked_count(seq_len, 0.15))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"tokens_per_s": samples_per_s * seq_len, "first_step_s": first_s, "path": opt.last_path,
           **mfu_metrics(flops, samples_per_s, 1, name, "bf16" if device.type == "cuda" else "no")}
    if compile_model:  # recompiles after the first steps would show here
        out["recompiles"] = _recompiles()
    return out


def _recompiles() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0


# ------------------------------------------------------------------------------------------- lb-train
def lb_train(overrides: list[str], cache_dir: str) -> dict:
    """The trainer in this process with these overrides; tokens/s of its log lines after the first."""
    from largebatch.config import compose
    from largebatch.runfolder import read_metrics
    from largebatch.train import train

    run = Path(tempfile.mkdtemp(prefix="gpu_bench_run_"))
    cfg = compose([*overrides, f"data.cache_dir={cache_dir}"])
    started = time.perf_counter()
    train(cfg, run)
    rates = [line["tokens_per_s"] for line in read_metrics(run) if "tokens_per_s" in line]
    shutil.rmtree(run, ignore_errors=True)
    return {"tokens_per_s": statistics.median(rates[1:] or rates), "log_lines": len(rates),
            "wall_s": time.perf_counter() - started, "num_workers": cfg.data.num_workers}


def prepare(cache_dir: str) -> None:
    """Tokenize the bundled corpus at length 128 here and copy the cache to the key the GPU machine will
    compute (its data packages are absent, so it sees no input files: the key's ``inputs`` is empty)."""
    from largebatch.config import compose
    from largebatch.data import _cache_dir, _cache_spec, build_mlm_data

    cfg = compose([*LB_TRAIN, f"data.cache_dir={cache_dir}"])
    build_mlm_data(cfg.data, cfg.model.vocab_size, 128, cfg.seed)
    spec = _cache_spec(cfg.data, cfg.model.vocab_size)
    there = _cache_dir(cfg.data, {**spec, "inputs": []})
    if not there.exists():
        shutil.copytree(_cache_dir(cfg.data, spec), there)
    print(f"prepared {there}: carry {cache_dir} (and .whl) to the GPU machine")


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results/bench/gpu.md"))
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per row")
    ap.add_argument("--model-steps", type=int, default=4, help="timed training steps per bare-model row")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache/largebatch"))
    ap.add_argument("--skip-compile", action="store_true", help="leave out the compiled bare-model rows")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    ap.add_argument("--prepare", action="store_true", help="build the data cache the GPU machine needs, and stop")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(args.cache_dir)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available here; run it on the GPU machine (or --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = ("tiny",) if args.dry_run else ("base", "large")
    micro, accumulation, seq_len = (4, 2, 32) if args.dry_run else (256, 8, 128)
    train_overrides = (["scale=tiny", "batch=8", "micro_batch=4", "epochs=0.02", "save_checkpoint=false",
                        "progress=false", "eval_max_batches=1", "log_every=1"] if args.dry_run
                       else [*LB_TRAIN, "epochs=0.7"])
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
    except OSError:  # no git on the machine
        sha = ""
    what = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if device.type == "cuda"
            else "CPU (dry run: tiny shapes, numbers mean nothing)")
    report = Report(Path(args.out), f"""# GPU speed: fused LAMB/LARS, the data path, MFU

Produced by `scripts/device/gpu_bench.py`; do not edit by hand.

- command: `python {' '.join(sys.argv)}`
- date: {datetime.datetime.now().isoformat(timespec='seconds')}
- device: {what}; torch {torch.__version__}; git {sha or 'unknown'}
""")
    ok = True
    sections = [
        ("numerics", lambda: _numerics_section(device, report)),
        ("optimizer", lambda: _speed_section(sizes, device, 3 if args.dry_run else args.steps, report)),
        ("model", lambda: _model_section(sizes, device, micro, accumulation, seq_len, args, train_overrides, report)),
    ]
    for name, run in sections:
        try:
            ok &= run() is not False
        except Exception:  # keep the other sections: a report with a failed section beats none
            report.add(f"\n## {name}: FAILED\n\n```\n{traceback.format_exc()[-3000:]}\n```")
            ok = False
    return 0 if ok else 1


def _numerics_section(device, report) -> bool:
    rows, ok = check_numerics(device)
    report.add("\n## Numerics: the GPU path against the CPU path (10 steps, identical gradients)\n\n"
               "| optimizer | params | reference path | GPU path | max rel. error | verdict |\n|---|---|---|---|---|---|\n"
               + "\n".join(rows))
    return ok


def _speed_section(sizes, device, steps, report) -> None:
    rows = [row for size in sizes for row in optimizer_speed(size, device, steps)]
    report.add(f"\n## Optimizer step (median ms of {steps} after 3 warm-up steps, synchronised)\n\n"
               "| parameter set | optimizer | path | ms/step | x torch AdamW fused | goal |\n|---|---|---|---|---|---|\n"
               + "\n".join(rows))


def _model_section(sizes, device, micro, accumulation, seq_len, args, train_overrides, report) -> None:
    vocab = 30522 if device.type == "cuda" else 2048
    rows, bare = [], {}
    for size in sizes:
        for compiled in (False,) if args.skip_compile else (False, True):
            r = bare_model(size, device, micro, accumulation, seq_len, args.model_steps, compiled, vocab)
            bare[(size, compiled)] = r
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the model and its state are gone with bare_model's frame
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "—"
            rows.append(f"| {size} | {'compiled' if compiled else 'eager'} | {r['tokens_per_s']:,.0f} | "
                        f"{r.get('tflops', 0):.0f} | {mfu} | {r['first_step_s']:.1f} | {r.get('recompiles', '—')} |")
    report.add(f"\n## Bare model (seq {seq_len}, micro-batch {micro} x {accumulation}, bf16 autocast, LAMB, "
               "synthetic masked batch; FLOPs: largebatch/flops.py)\n\n"
               "| BERT | mode | tokens/s | TFLOP/s | MFU | first step (s) | recompiles |\n|---|---|---|---|---|---|---|\n"
               + "\n".join(rows))
    from largebatch.config import compose

    train_vocab = compose(train_overrides).model.vocab_size  # the bundled corpus's own WordPiece vocabulary
    same = bare_model(sizes[0], device, micro, accumulation, seq_len, args.model_steps, False, train_vocab)
    report.add(f"\nThe same bare model with lb-train's vocabulary ({train_vocab}): {same['tokens_per_s']:,.0f} tokens/s "
               "(the reference of the goal below).")
    trained = lb_train(train_overrides, args.cache_dir)
    reference = same["tokens_per_s"]
    share = trained["tokens_per_s"] / reference
    report.add(f"\n## lb-train with the defaults (data.num_workers={trained['num_workers']} resolved per device)\n\n"
               f"`lb-train {' '.join(train_overrides)}`: {trained['tokens_per_s']:,.0f} tokens/s (median of "
               f"{trained['log_lines']} log lines after the first; {trained['wall_s']:.0f} s in all) = {share:.1%} of "
               f"the bare model's eager {reference:,.0f} (same vocabulary); goal >= 95%: "
               f"{'met' if share >= 0.95 else 'NOT met'}.")


if __name__ == "__main__":
    raise SystemExit(main())
