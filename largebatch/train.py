"""The training loop: one function, read top to bottom.

Factories build the data, model and optimizer; the plan fixes every stage's steps, lr and
accumulation; the loop steps, evaluates, logs and checkpoints. Accelerate runs it on one CPU, on
several CPU processes (gloo), on GPUs (DDP/FSDP through `accelerate config`) or on TPU.

Exact large batches: the loss of each micro-batch is its SUM over targets divided by the GLOBAL number
of targets of the step (all micro-batches, all ranks), times the world size because DDP averages
gradients over ranks. Any split of a batch over micro-batches and ranks then gives the same gradient.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from itertools import count
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from largebatch.data import GlobalBatchSampler, build_mlm_data
from largebatch.errors import ConfigError, NonFiniteError
from largebatch.models import build_model
from largebatch.models.bert import IGNORE_INDEX
from largebatch.optim import create_optimizer, trust_ratio_stats
from largebatch.plan import format_plan, lr_schedule, plan_stage, stage_specs
from largebatch.tracking import RunRecorder

log = logging.getLogger(__name__)

OPTIMIZER_KEYS_NOT_OPTIONS = ("name", "lr", "weight_decay")


def make_accelerator(cfg) -> Accelerator:
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.precision)
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"the launcher started {expected} processes but Accelerate sees a world of "
            f"{accelerator.num_processes}: every rank would train alone. On CPU launch with "
            "`torchrun --standalone --nproc_per_node N -m largebatch.cli ...` or `accelerate launch --multi_gpu "
            "--num_processes N --num_machines 1 -m largebatch.cli ...` (not `accelerate launch --cpu`)"
        )
    return accelerator


def optimizer_options(opt_cfg) -> dict:
    options = OmegaConf.to_container(opt_cfg, resolve=True)
    return {k: v for k, v in options.items() if k not in OPTIMIZER_KEYS_NOT_OPTIONS and v is not None}


def global_norm(tensors) -> torch.Tensor:
    tensors = [t for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


@torch.no_grad()
def evaluate(model, dataset, eval_batch: int, accelerator, max_batches: int | None) -> dict:
    """Masked-token loss and accuracy over the first max_batches x eval_batch held-out sequences
    (the same ones whatever the world size: they are sharded over ranks, then the sums reduced)."""
    model.eval()
    limit = len(dataset) if max_batches is None else min(len(dataset), max_batches * eval_batch)
    indices = list(range(accelerator.process_index, limit, accelerator.num_processes))
    batches = [indices[i:i + eval_batch] for i in range(0, len(indices), eval_batch)]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for idx in batches:
        batch = {k: v.to(accelerator.device) for k, v in torch.utils.data.default_collate(
            [dataset[i] for i in idx]).items()}
        with accelerator.autocast():
            out = model(**batch)
        totals[0] += out["loss_sum"].double()
        totals[1] += out["count"]
        totals[2] += out["correct"].double()
    loss_sum, n, correct = accelerator.reduce(totals, reduction="sum").tolist()
    model.train()
    return {"eval/loss": loss_sum / max(n, 1), "eval/accuracy": correct / max(n, 1), "eval/tokens": int(n)}


def step_batches(loader, sampler, dataset, accumulation: int, epoch_offset: int):
    """Yield (epoch, [micro-batches of one optimizer step]) forever, epoch after epoch."""
    for epoch in count():
        sampler.set_epoch(epoch_offset + epoch)
        dataset.set_epoch(epoch_offset + epoch)
        group = []
        for micro in loader:
            group.append(micro)
            if len(group) == accumulation:
                yield epoch, group
                group = []


def train(cfg, run_dir: Path) -> dict:
    accelerator = make_accelerator(cfg)
    world, device = accelerator.num_processes, accelerator.device
    set_seed(cfg.seed)

    # ---------------------------------------------------------------- data and plan
    specs = stage_specs(cfg)
    with accelerator.main_process_first():  # rank 0 builds the tokenizer/sequence cache, then the others load it
        data = {L: build_mlm_data(cfg.data, cfg.model.vocab_size, L, cfg.seed) for L in {s.seq_len for s in specs}}
    plans = [plan_stage(cfg, s, len(data[s.seq_len].train), world) for s in specs]
    vocab_size = next(iter(data.values())).vocab_size

    # Nothing is written before the plan is known to be valid.
    recorder = RunRecorder(run_dir, cfg, enabled=accelerator.is_main_process, world_size=world, device=str(device))
    recorder.plan(plans)
    if accelerator.is_main_process:
        log.info("plan (scaling rule %s, ref_batch %d, ref_lr %g):\n%s", cfg.scaling.rule, cfg.scaling.ref_batch,
                 cfg.scaling.ref_lr, format_plan(plans))

    # ---------------------------------------------------------------- model and optimizer
    model = build_model(cfg.model, vocab_size, max(s.seq_len for s in specs))
    optimizer = create_optimizer(model, cfg.optimizer.name, lr=plans[0].lr, weight_decay=cfg.optimizer.weight_decay,
                                 **optimizer_options(cfg.optimizer))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("model: %s, %.2fM trainable parameters", cfg.model.name, sum(p.numel() for p in params) / 1e6)

    # ---------------------------------------------------------------- training
    total_steps = sum(p.total_steps for p in plans)
    bar = tqdm(total=total_steps, disable=not (cfg.progress and accelerator.is_main_process), desc="train")
    step = samples = skipped = 0
    last_eval = None
    started = time.perf_counter()
    for stage_index, plan in enumerate(plans):
        dataset = data[plan.seq_len].train
        eval_set = data[plan.seq_len].eval
        sampler = GlobalBatchSampler(len(dataset), plan.batch, plan.micro_batch, rank=accelerator.process_index,
                                     world_size=world, seed=cfg.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)
        lr_at = lr_schedule(cfg.schedule, plan)
        eval_every = max(1, round(cfg.eval_every_epochs * plan.train_samples))  # in samples
        window = {"loss": torch.zeros((), dtype=torch.float64, device=device), "steps": 0,
                  "time": time.perf_counter(), "samples": 0}
        batches = step_batches(loader, sampler, dataset, plan.accumulation, epoch_offset=1000 * stage_index)

        for stage_step in range(plan.total_steps):
            epoch, micro_batches = next(batches)
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
            local_count = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)
            global_count = accelerator.reduce(local_count.to(device), reduction="sum").clamp(min=1)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for i, mb in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                    out = model(**mb)
                    loss = out["loss_sum"] * (world / global_count)
                accelerator.backward(loss)
                step_loss += out["loss_sum"].detach().double()

            lr = lr_at(stage_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if accelerator.scaler is not None:
                accelerator.unscale_gradients()
            grad_norm = global_norm(p.grad for p in params)
            step_loss = accelerator.reduce(step_loss, reduction="sum") / global_count
            is_log_step = (stage_step + 1) % cfg.log_every == 0 or stage_step + 1 == plan.total_steps
            before = None
            if not bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss)):
                message = (f"non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient norm'} at step {step} "
                           f"(stage {plan.name}, lr {lr:.3g}): loss={step_loss.item()}, grad_norm={grad_norm.item()}. "
                           "Lower the learning rate, lengthen warmup, enable gradient clipping, or set "
                           "on_nonfinite=skip to skip such steps")
                if cfg.on_nonfinite != "skip":
                    raise NonFiniteError(message)
                log.warning("skipping step: %s", message)
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
            else:
                before = [p.detach().clone() for p in params] if is_log_step else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                window["loss"] += step_loss
            step += 1
            samples += plan.batch
            window["steps"] += 1
            window["samples"] += plan.batch
            bar.update(1)

            if is_log_step and window["steps"]:
                elapsed = time.perf_counter() - window["time"]
                metrics = {
                    "step": step, "stage": plan.name, "epoch": stage_step / plan.steps_per_epoch, "samples": samples,
                    "loss": window["loss"].item() / window["steps"], "lr": lr, "grad_norm": grad_norm.item(),
                    "param_norm": global_norm(params).item(), "samples_per_s": window["samples"] / elapsed,
                    "tokens_per_s": window["samples"] * plan.seq_len / elapsed, "skipped_steps": skipped,
                }
                if before is not None:
                    metrics["update_norm"] = global_norm([p.detach() - b for p, b in zip(params, before)]).item()
                metrics.update(trust_ratio_stats(optimizer.optimizer, per_layer=cfg.per_layer_trust_ratios))
                recorder.log(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{lr:.2e}")
                window.update(loss=torch.zeros_like(window["loss"]), steps=0, samples=0, time=time.perf_counter())

            end_of_stage = stage_step + 1 == plan.total_steps
            if samples // eval_every > (samples - plan.batch) // eval_every or end_of_stage:
                eval_started = time.perf_counter()
                last_eval = evaluate(model, eval_set, cfg.eval_batch, accelerator, cfg.eval_max_batches)
                recorder.log({"step": step, "stage": plan.name, "samples": samples, **last_eval})
                window["time"] += time.perf_counter() - eval_started  # throughput excludes evaluation
    bar.close()
    wall = time.perf_counter() - started

    # ---------------------------------------------------------------- records and checkpoint
    if cfg.save_checkpoint:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(run_dir / "checkpoint"))
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(run_dir / "model")
            next(iter(data.values())).tokenizer.save_pretrained(run_dir / "model")
    summary = {"steps": step, "samples": samples, "skipped_steps": skipped, "wall_time_s": wall,
               "samples_per_s": samples / wall, "world_size": world, "optimizer": cfg.optimizer.name,
               "batch": plans[-1].batch, "final_loss": _last_loss(run_dir) if accelerator.is_main_process else None,
               **(last_eval or {})}
    recorder.finish(summary)
    if accelerator.is_main_process:
        log.info("done in %.1f s: %s", wall, {k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in summary.items()})
    accelerator.end_training()
    return summary


def _last_loss(run_dir: Path) -> float | None:
    import json

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    return losses[-1] if losses and math.isfinite(losses[-1]) else None
