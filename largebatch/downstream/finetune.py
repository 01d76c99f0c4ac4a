"""The fine-tuning loop both downstream tasks share, and the evaluation pass after it.

Recipe (BERT fine-tuning, Devlin et al. 2019, sec. 4 and A.3): AdamW (betas 0.9/0.999, eps 1e-6), weight
decay 0.01 except biases and LayerNorm, linear warmup over the first 10% of the steps then linear decay to
0, dropout as in pretraining. One fixed recipe per task, no per-checkpoint search, so the comparison across
pretraining batch sizes is not confounded by tuning. Training runs in fp32 on CPU and in bf16 autocast on
a GPU, without gradient accumulation.
"""

from __future__ import annotations

import contextlib

import torch

from largebatch.optim.param_groups import build_param_groups
from largebatch.sched.durations import epochs_to_steps, steps_per_epoch
from largebatch.sched.schedules import build_schedule

# How a fine-tune runs, not what it computes: left out of the recipe that a result records.
_NOT_RECIPE = ("model_dir", "threads", "device")


def recipe_of(arguments: dict) -> dict:
    """A fine-tune's arguments (its ``locals()`` on entry) as the recipe its result records."""
    return {k: v for k, v in arguments.items() if k not in _NOT_RECIPE}


def resolve_device(device: str | None) -> torch.device:
    """``device``, or the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set for one fine-tune (timings comparable across runs), then restored."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bf16_autocast(device: torch.device):
    """bf16 autocast on a GPU; on CPU a no-op, so CPU runs stay in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def batches(data: dict[str, torch.Tensor], order: torch.Tensor, batch: int, device):
    """Batches of ``data`` rows in ``order``, trimmed to their longest sequence (right padding)."""
    for i in range(0, len(order), batch):
        rows = order[i : i + batch]
        length = int(data["attention_mask"][rows].sum(1).max())
        yield {k: (v[rows, :length] if v.dim() == 2 else v[rows]).to(device) for k, v in data.items()}


def fit(model, data, *, epochs, batch, lr, warmup_fraction, weight_decay, seed, device) -> int:
    """Fine-tune ``model`` on ``data`` (tensors incl. the labels); returns the number of steps."""
    n = len(data["input_ids"])
    per_epoch = steps_per_epoch(n, batch)
    total = epochs_to_steps(epochs, per_epoch)
    warmup = epochs_to_steps(warmup_fraction * epochs, per_epoch) if warmup_fraction > 0 else 0
    lr_at = build_schedule("linear", peak_lr=lr, total_steps=total, warmup_steps=warmup,
                           steps_per_epoch=per_epoch)
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999),
                                  eps=1e-6)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    step = 0
    while step < total:
        # Whole batches only (as steps_per_epoch counts them); a fresh shuffle every epoch.
        order = torch.randperm(n, generator=generator)[: per_epoch * batch]
        for inputs in batches(data, order, batch, device):
            if step == total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with bf16_autocast(device):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    return total


@torch.no_grad()
def predict(model, data: dict[str, torch.Tensor], batch: int, device):
    """``(inputs, outputs)`` of ``model`` in eval mode for every row of ``data``, in order."""
    model.eval()
    for inputs in batches(data, torch.arange(len(data["input_ids"])), batch, device):
        with bf16_autocast(device):
            outputs = model(**inputs)
        yield inputs, outputs
