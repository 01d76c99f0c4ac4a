"""Run by tests/test_scaleout.py under `torchrun --nproc_per_node 2`: every registry optimizer steps a
model sharded by the trainer's FSDP2 strategy (uneven shards included), and each rank compares it with
the same model trained unsharded on the whole batch. Rank 0 writes the findings as JSON to argv[1]."""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from accelerate import Accelerator
from torch import nn

from largebatch.distributed import FullyShardedDataParallel
from largebatch.optim import OPTIMIZERS, create_optimizer, trust_ratio_stats

STEPS, MICRO_BATCHES, BATCH = 3, 2, 16
CASES = [(name, {}) for name in OPTIMIZERS] + [("adamw", {"grad_clip_norm": 0.05}), ("lars", {"grad_clip_norm": 0.05})]


class Toy(nn.Module):
    """Root parameters, a ModuleList of blocks (FSDP units of their own) and a head of 3 rows, which
    two ranks split unevenly (2 + 1)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2)])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def loss_sum(model, x, y):
    return ((model(x) - y) ** 2).sum()


def main(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 3, generator=generator)
    parallel = FullyShardedDataParallel(accelerator)
    results = {}
    for name, options in CASES:
        torch.manual_seed(0)
        reference = Toy()
        torch.manual_seed(0)
        model = parallel.shard(Toy())
        ref_opt = create_optimizer(reference, name, lr=0.05, weight_decay=0.01, implementation="foreach", **options)
        opt = create_optimizer(model, name, lr=0.05, weight_decay=0.01, **options)  # implementation=auto
        start = [p.detach().clone() for p in reference.parameters()]
        for _ in range(STEPS):
            (loss_sum(reference, x, y) / BATCH).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            mine = torch.arange(rank, BATCH, world).chunk(MICRO_BATCHES)
            for i, rows in enumerate(mine):
                context = parallel.no_sync(model) if i < len(mine) - 1 else contextlib.nullcontext()
                with context:
                    (loss_sum(model, x[rows], y[rows]) * world / BATCH).backward()
            opt.step()
            opt.zero_grad()
        diff = max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters()))
        moved = max((q - s).abs().max().item() for q, s in zip(reference.parameters(), start))
        stats, ref_stats = trust_ratio_stats(opt, per_layer=True), trust_ratio_stats(ref_opt, per_layer=True)
        ratio_diff = max((abs(stats[k] - v) / abs(v) for k, v in ref_stats.items()), default=0.0)
        results[f"{name}{options or ''}"] = {"diff": diff, "moved": moved, "ratio_keys_equal": stats.keys() == ref_stats.keys(),
                                             "ratio_rel_diff": ratio_diff, "path": getattr(opt, "last_path", None)}

    # implementation='cpp' cannot see whole tensors: refused with the way out.
    model = parallel.shard(Toy())
    opt = create_optimizer(model, "lamb", lr=0.05, implementation="cpp")
    loss_sum(model, x, y).backward()
    try:
        opt.step()
        results["cpp_error"] = None
    except ValueError as error:
        results["cpp_error"] = str(error)

    # Evaluation needs no collective per forward: ranks may run different numbers of batches.
    with torch.no_grad(), parallel.evaluation(model):
        outputs = [model(x[:4]) for _ in range(2 if rank == 0 else 1)]
    loss_sum(model, x, y).backward()  # training resumes on resharded parameters
    results["evaluation_forwards"] = len(outputs)
    results["resharded"] = all(type(p).__name__ == "DTensor" and p.to_local().shape[0] < p.shape[0]
                               for p in model.parameters() if p.dim() == 2)
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(results, f)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
