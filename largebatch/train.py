"""The training loop: one function, read top to bottom.

The task (``largebatch.tasks``) builds the data and model and cuts each step into micro-batches; the
plan fixes every stage's steps, lr and accumulation; the loop steps, evaluates, logs and checkpoints,
and knows nothing of what it trains. Accelerate runs it on one CPU, on
several CPU processes (gloo), on GPUs (DDP/FSDP through `accelerate config`) or on TPU.

Exact large batches: the loss of each micro-batch is its SUM over targets divided by the GLOBAL count
that normalises the task's loss (masked tokens, streams, samples; all micro-batches, all ranks), times
the world size because DDP averages gradients over ranks. Any split of a batch over micro-batches and
ranks then gives the same gradient. The logged loss is the per-target mean (its exp is perplexity).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from largebatch.config import optimizer_options
from largebatch.errors import ConfigError, NonFiniteError
from largebatch.optim import create_optimizer, trust_ratio_stats
from largebatch.plan import build_plans, format_plan, lr_schedule
from largebatch.tasks import build_task
from largebatch.tracking import RunRecorder

log = logging.getLogger(__name__)

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


def global_norm(tensors) -> torch.Tensor:
    tensors = [t for t in tensors if t is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def train(cfg, run_dir: Path) -> dict:
    accelerator = make_accelerator(cfg)
    world, device = accelerator.num_processes, accelerator.device
    set_seed(cfg.seed)

    # ---------------------------------------------------------------- task and plan
    task = build_task(cfg)
    with accelerator.main_process_first():  # rank 0 builds the data caches, then the others load them
        plans = build_plans(cfg, task, world)

    # Nothing is written before the plan is known to be valid.
    recorder = RunRecorder(run_dir, cfg, enabled=accelerator.is_main_process, world_size=world, device=str(device))
    recorder.plan(plans)
    if accelerator.is_main_process:
        log.info("plan (scaling rule %s, ref_batch %d, ref_lr %g):\n%s", cfg.scaling.rule, cfg.scaling.ref_batch,
                 cfg.scaling.ref_lr, format_plan(plans))

    # ---------------------------------------------------------------- model and optimizer
    model = task.build_model()
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
    step = samples = skipped = skipped_in_a_row = 0
    last_eval, last_loss = None, None
    started = time.perf_counter()
    for stage_index, plan in enumerate(plans):
        lr_at = lr_schedule(cfg.schedule, plan)
        eval_every = max(1, round(cfg.eval_every_epochs * plan.train_samples))  # in samples
        tokens_per_sample = task.tokens_per_sample(plan.seq_len)
        window = {"loss": 0.0, "loss_steps": 0, "steps": 0, "time": time.perf_counter(), "samples": 0}
        batches = task.steps(plan, stage_index=stage_index, rank=accelerator.process_index, world_size=world)

        for stage_step in range(plan.total_steps):
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in next(batches)]
            local_count = sum(task.normaliser(mb) for mb in micro_batches)
            global_count = accelerator.reduce(torch.as_tensor(local_count, device=device), reduction="sum").clamp(min=1)
            totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets: the logged mean
            for slot, mb in enumerate(micro_batches):
                last = slot == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                    out = task.forward(model, mb, slot)
                    loss = out["loss_sum"] * (world / global_count)
                accelerator.backward(loss)
                totals[0] += out["loss_sum"].detach().double()
                totals[1] += out["count"]

            lr = lr_at(stage_step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if accelerator.scaler is not None:
                accelerator.unscale_gradients()
            grad_norm = global_norm(p.grad for p in params)
            loss_sum, targets = accelerator.reduce(totals, reduction="sum")
            step_loss = loss_sum / targets.clamp(min=1)
            is_log_step = (stage_step + 1) % cfg.log_every == 0 or stage_step + 1 == plan.total_steps
            before = None
            if not bool(torch.isfinite(grad_norm) & torch.isfinite(step_loss)):
                message = (f"non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient norm'} at step {step} "
                           f"(stage {plan.name}, lr {lr:.3g}): loss={step_loss.item()}, grad_norm={grad_norm.item()}. "
                           "Lower the learning rate, lengthen warmup, enable gradient clipping, or set "
                           "on_nonfinite=skip to skip such steps")
                if cfg.on_nonfinite != "skip":
                    raise NonFiniteError(message)
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                if skipped_in_a_row > cfg.max_consecutive_skips:
                    raise NonFiniteError(f"{skipped_in_a_row} steps in a row were non-finite (max_consecutive_skips="
                                         f"{cfg.max_consecutive_skips}); the run is not recovering. Last: {message}")
                log.warning("skipping step: %s", message)
                optimizer.zero_grad(set_to_none=True)
            else:
                before = [p.detach().clone() for p in params] if is_log_step else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped_in_a_row = 0
                window["loss"] += step_loss.item()
                window["loss_steps"] += 1
            step += 1
            samples += plan.batch
            window["steps"] += 1
            window["samples"] += plan.batch
            bar.update(1)

            if is_log_step and window["steps"]:
                elapsed = time.perf_counter() - window["time"]
                metrics = {
                    "step": step, "stage": plan.name, "epoch": stage_step / plan.steps_per_epoch, "samples": samples,
                    "lr": lr, "grad_norm": grad_norm.item(),
                    "param_norm": global_norm(params).item(), "samples_per_s": window["samples"] / elapsed,
                    "skipped_steps": skipped,
                }
                if window["loss_steps"]:  # the mean over the window's steps that were not skipped
                    last_loss = metrics["loss"] = window["loss"] / window["loss_steps"]
                if tokens_per_sample:
                    metrics["tokens_per_s"] = window["samples"] * tokens_per_sample / elapsed
                if before is not None:
                    metrics["update_norm"] = global_norm([p.detach() - b for p, b in zip(params, before)]).item()
                metrics.update(trust_ratio_stats(optimizer.optimizer, per_layer=cfg.per_layer_trust_ratios))
                recorder.log(metrics)
                bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.3f}", lr=f"{lr:.2e}")
                window.update(loss=0.0, loss_steps=0, steps=0, samples=0, time=time.perf_counter())

            end_of_stage = stage_step + 1 == plan.total_steps
            if samples // eval_every > (samples - plan.batch) // eval_every or end_of_stage:
                eval_started = time.perf_counter()
                last_eval = task.evaluate(model, accelerator, plan)
                recorder.log({"step": step, "stage": plan.name, "samples": samples, **last_eval})
                window["time"] += time.perf_counter() - eval_started  # throughput excludes evaluation
    bar.close()
    wall = time.perf_counter() - started

    # ---------------------------------------------------------------- records and checkpoint
    if cfg.save_checkpoint:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(run_dir / "checkpoint"))
        if accelerator.is_main_process:
            task.save_model(accelerator.unwrap_model(model), run_dir / "model")
    summary = {"steps": step, "samples": samples, "skipped_steps": skipped, "wall_time_s": wall,
               "samples_per_s": samples / wall, "world_size": world, "optimizer": cfg.optimizer.name,
               "batch": plans[-1].batch, "final_loss": last_loss if last_loss is not None and math.isfinite(last_loss)
               else None, "primary_metric": task.primary.name, **(last_eval or {})}
    recorder.finish(summary)
    if accelerator.is_main_process:
        log.info("done in %.1f s: %s", wall, {k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in summary.items()})
    accelerator.end_training()
    return summary
