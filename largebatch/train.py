"""The training loop: `_train` reads as the algorithm, its parts are the named helpers below it.

The task (``largebatch.tasks``) builds the data and model and cuts each step into micro-batches; the
plan fixes every stage's steps, lr and accumulation; the loop steps, evaluates, logs and checkpoints,
and knows nothing of what it trains. Accelerate runs it on one CPU, on
several CPU processes (gloo), on GPUs (DDP, or FSDP2 with ``sharding=fsdp2``: ``largebatch.distributed``)
or on TPU.

Exact large batches: the loss of each micro-batch is its SUM over targets divided by the GLOBAL count
that normalises the task's loss (masked tokens, streams, samples; all micro-batches, all ranks), times
the world size because DDP (and FSDP2's reduce-scatter) averages gradients over ranks. Any split of a
batch over micro-batches and ranks then gives the same gradient. The logged loss is the per-target mean
(its exp is perplexity).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from largebatch import runfolder
from largebatch.checkpoint import (
    GracefulStop,
    Interrupted,
    TrainerState,
    config_differences,
    load_checkpoint,
    newest_whole_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from largebatch.config import optimizer_options, validate
from largebatch.device import resolve_device_type, resolve_precision
from largebatch.distributed import adopt_cluster_environment, check_launch, data_parallel
from largebatch.errors import ConfigError, DiskFullError, NonFiniteError
from largebatch.fileio import atomic_dir
from largebatch.flops import mfu_metrics
from largebatch.noise import NoiseScale
from largebatch.optim import create_optimizer, trust_ratio_stats
from largebatch.plan import build_plans, format_plan, lr_schedule
from largebatch.tasks import build_task
from largebatch.tracking import RunRecorder

log = logging.getLogger(__name__)

def make_accelerator(cfg) -> Accelerator:
    adopt_cluster_environment()
    check_launch(cfg)
    cpu = resolve_device_type(cfg.device) == "cpu"
    precision = resolve_precision(cfg.precision, "cpu" if cpu else "cuda")
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    log.info("precision=%s: %s", cfg.precision, precision if precision != "no" else "fp32")
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
    """The 2-norm of all the tensors together, as a plain tensor equal on every rank. A sharded tensor's
    (DTensor's) norm is reduced over its shards: the norm of the whole tensor."""
    tensors = [t for t in tensors if t is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
    return total.full_tensor() if isinstance(total, DTensor) else total


def lock_run_dir(run_dir: Path):
    """An exclusive OS lock on ``run_dir`` for the life of the run: the open lock file (keep it open; closing
    it, or the process's death, releases it, so a crashed run's folder is free again). Refused, naming the
    holder, while another live process holds it: two writers would interleave one run's records."""
    import fcntl
    import os
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / runfolder.LOCK, "a+")  # noqa: SIM115 - held open for the run's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"the run folder {run_dir} is in use by a live run ({holder}): wait for it to end, or "
                          "stop it (SIGTERM: it checkpoints first) and then resume=auto") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def open_run_dir(cfg, run_dir: Path, lock: bool = True) -> tuple[Path, Path | None, object]:
    """(the folder this run writes, the checkpoint it resumes from, the folder's lock: held when ``lock``).
    A folder in use by a live run is refused; one that already holds a run is refused unless the config says
    to resume it (same config) or to overwrite it."""
    if cfg.resume not in (None, "auto"):
        run_dir = Path(cfg.resume)
        if not (run_dir / runfolder.CONFIG).is_file():
            raise ConfigError(f"resume={cfg.resume}: no run there (no config.yaml); give the folder of the run to "
                              "continue, or resume=auto to continue the run in hydra.run.dir if it has one")
    held = lock_run_dir(run_dir) if lock else None
    try:
        return (run_dir, *_checked_run_dir(cfg, run_dir), held)
    except BaseException:
        if held is not None:
            held.close()
        raise


def _checked_run_dir(cfg, run_dir: Path) -> tuple[Path | None]:
    holds_run = runfolder.holds_run(run_dir)
    if holds_run and cfg.resume is not None and (run_dir / runfolder.CONFIG).is_file():
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / runfolder.CONFIG))
        differences = config_differences(saved, OmegaConf.to_container(cfg, resolve=True))
        if differences:
            raise ConfigError(f"resume: the run in {run_dir} was started with another config ("
                              + "; ".join(differences[:5]) + "); resume it with the same overrides")
        checkpoint = newest_whole_checkpoint(run_dir)
        if checkpoint is None and runfolder.status_of(run_dir) == runfolder.FINISHED and not cfg.overwrite:
            raise ConfigError(f"resume: the run in {run_dir} finished without a checkpoint (save_checkpoint=false): "
                              "there is nothing to continue; overwrite=true trains it again")
        return (checkpoint,)
    if holds_run and cfg.resume is not None:  # a sweep job that failed before its run wrote anything
        return (None,)
    if holds_run and not cfg.overwrite:
        raise ConfigError(f"the run folder {run_dir} already holds a run (status: {runfolder.status_of(run_dir)}); resume it with "
                          "resume=auto, replace it with overwrite=true, or choose another hydra.run.dir")
    return (None,)


def clear_run_records(run_dir: Path) -> None:
    for name in runfolder.RUN_RECORDS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def train(cfg, run_dir: Path) -> dict:
    validate(cfg)  # lb-plan's checks, before the accelerator, the data or the run folder is touched
    accelerator = make_accelerator(cfg)
    world, device = accelerator.num_processes, accelerator.device
    set_seed(cfg.seed)

    # ---------------------------------------------------------------- task, plan, run folder
    task = build_task(cfg)
    with accelerator.main_process_first():  # rank 0 builds the data caches, then the others load them
        plans = build_plans(cfg, task, world)
    run_dir, checkpoint, run_lock = open_run_dir(cfg, Path(run_dir), lock=accelerator.is_main_process)
    resuming = checkpoint is not None
    try:
        if accelerator.is_main_process and not resuming:
            clear_run_records(run_dir)  # overwrite=true, or resume of a run that never checkpointed
        accelerator.wait_for_everyone()
        # Nothing is written before the plan and the folder are known to be valid.
        state = read_trainer_state(checkpoint) if resuming else TrainerState()
        recorder = RunRecorder(run_dir, cfg, enabled=accelerator.is_main_process, world_size=world,
                               device=str(device), resume_step=state.step if resuming else None)
    except BaseException:
        if run_lock is not None:
            run_lock.close()  # a folder this process could not start a run in is free again at once
        raise
    try:
        with GracefulStop() as stop:
            summary = _train(cfg, run_dir, accelerator, task, plans, recorder, checkpoint, state, stop)
    except Interrupted as interrupted:
        recorder.status("interrupted", error=str(interrupted), step=interrupted.step)
        recorder.close()
        raise
    except BaseException as error:
        full = isinstance(error, OSError) and error.errno == errno.ENOSPC  # a record's write, not a checkpoint's
        reason = DiskFullError(f"the disk is full ({error}); free space, then continue with resume=auto "
                               f"hydra.run.dir={run_dir}") if full else error
        recorder.status("failed", error=f"{type(reason).__name__}: {reason}", step=state.step)
        with contextlib.suppress(OSError):
            recorder.close()
        if full:
            raise reason from None
        raise
    else:
        recorder.status("finished", step=summary["steps"])
        recorder.close()
    finally:
        if run_lock is not None:
            run_lock.close()  # after the last record
    accelerator.end_training()
    return summary


@dataclass
class Loop:
    """What every step of a run needs, built once by :func:`_build`."""

    cfg: object
    accelerator: Accelerator
    task: object
    parallel: object  # largebatch.distributed's strategy: DDP or FSDP2
    model: torch.nn.Module
    optimizer: object  # Accelerate's wrapper of core_optimizer
    core_optimizer: torch.optim.Optimizer
    params: list
    noise: NoiseScale | None  # the gradient noise scale, measured on log steps (largebatch/noise.py)
    recorder: RunRecorder
    stages: int
    target: dict = field(default_factory=dict)  # stop_at: when the run reached it


@dataclass
class Stage:
    """A stage's constants: its lr schedule, evaluation and checkpoint periods (in samples), throughput units."""

    lr_at: object
    eval_every: int
    checkpoint_every: int | None
    tokens_per_sample: int | None
    flops_per_sample: float | None
    device_name: str


@dataclass
class Step:
    """One optimizer step, as its log line reports it."""

    stage_step: int
    lr: float
    grad_norm: torch.Tensor
    applied: bool  # False: skipped (on_nonfinite=skip)
    update_norm: float | None = None


def _train(cfg, run_dir, accelerator, task, plans, recorder, checkpoint, state, stop) -> dict:
    """The algorithm: for each stage, for each step: its micro-batches, one optimizer step, then log,
    evaluate and checkpoint on their periods; at the end the final evaluation, the summary, the model."""
    recorder.plan(plans)
    if accelerator.is_main_process:
        log.info("plan (scaling rule %s, ref_batch %d, ref_lr %g):\n%s", cfg.scaling.rule, cfg.scaling.ref_batch,
                 cfg.scaling.ref_lr, format_plan(plans))
    loop = _build(cfg, accelerator, task, plans, recorder, checkpoint, state)
    earlier_sessions_s, session_start = state.elapsed_s, time.perf_counter()

    def save() -> Path:
        state.elapsed_s = earlier_sessions_s + time.perf_counter() - session_start
        return save_checkpoint(accelerator, loop.parallel, task, state, run_dir, keep=cfg.keep_checkpoints)

    bar = tqdm(total=sum(p.total_steps for p in plans), initial=state.step,
               disable=not (cfg.progress and accelerator.is_main_process), desc="train")
    while state.stage_index < len(plans):
        plan = plans[state.stage_index]
        stage = _stage(loop, plan)
        window = state.window = state.window or {"loss": 0.0, "loss_steps": 0, "steps": 0, "samples": 0}
        clock = {"window_started": time.perf_counter()}  # throughput excludes evaluation
        batches = task.steps(plan, stage_index=state.stage_index, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, start_step=state.stage_step)
        while state.stage_step < plan.total_steps:
            is_log_step = (state.stage_step + 1) % cfg.log_every == 0 or state.stage_step + 1 == plan.total_steps
            step = _step(loop, plan, stage, next(batches), state, is_log_step)
            _count(state, window, plan, step)
            bar.update(1)
            if is_log_step and window["steps"]:
                bar.set_postfix(_log(loop, plan, stage, state, window, step, clock))
            end_of_stage = state.stage_step == plan.total_steps
            # a batch schedule evaluates on the run's period and at its end, not at the end of every phase
            evaluate_at_end = end_of_stage and (plan.run_schedule is None or state.stage_index == len(plans) - 1)
            if _crossed(state.samples, plan.batch, stage.eval_every) or evaluate_at_end:
                _evaluate(loop, plan, state, clock)
                if _reached_target(loop, state, earlier_sessions_s + time.perf_counter() - session_start):
                    state.stage_index, end_of_stage = len(plans), True  # the run is done: no more stages
            if end_of_stage and state.stage_index < len(plans):
                state.stage_index, state.stage_step, state.window = state.stage_index + 1, 0, {}
            _checkpoint_or_stop(loop, plan, stage, state, stop, save)
            if end_of_stage:
                break
    bar.close()
    return _finish(loop, plans, state, run_dir, earlier_sessions_s + time.perf_counter() - session_start, save)


def _build(cfg, accelerator, task, plans, recorder, checkpoint, state) -> Loop:
    """The model and optimizer (sharded, compiled, prepared), restored from ``checkpoint`` when resuming."""
    parallel = data_parallel(cfg, accelerator)
    model = parallel.shard(task.build_model())  # FSDP2: the optimizer must see the sharded parameters
    core_optimizer = create_optimizer(model, cfg.optimizer.name, lr=plans[0].lr,
                                      weight_decay=cfg.optimizer.weight_decay, **optimizer_options(cfg.optimizer))
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = parallel.prepare(model, core_optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    log.info("model: %s, %.2fM trainable parameters, sharding %s", cfg.model.name,
             sum(p.numel() for p in params) / 1e6, cfg.sharding)
    if checkpoint is not None:
        vars(state).update(vars(load_checkpoint(accelerator, parallel, task, checkpoint)))
        log.info("resumed from %s: stage %d, step %d, %d samples seen", checkpoint, state.stage_index, state.step,
                 state.samples)
    noise = None
    if cfg.noise_scale and cfg.sharding == "fsdp2":
        log.info("noise_scale: not measured under sharding=fsdp2 (a rank's local gradient is not materialised)")
    elif cfg.noise_scale:
        noise = NoiseScale(cfg.noise_scale_window, state.noise)
    return Loop(cfg, accelerator, task, parallel, model, optimizer, core_optimizer, params, noise, recorder,
                len(plans))


def _stage(loop: Loop, plan) -> Stage:
    cfg, device = loop.cfg, loop.accelerator.device
    return Stage(
        lr_at=lr_schedule(cfg.schedule, plan),
        eval_every=max(1, round(cfg.eval_every_epochs * plan.train_samples)),
        checkpoint_every=(max(1, round(cfg.checkpoint_every_epochs * plan.train_samples))
                          if cfg.checkpoint_every_epochs else None),
        tokens_per_sample=loop.task.tokens_per_sample(plan.seq_len),
        flops_per_sample=loop.task.flops_per_sample(loop.model, plan.seq_len),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device))


def _step(loop: Loop, plan, stage: Stage, micro_batches, state, is_log_step: bool) -> Step:
    """One optimizer step: every micro-batch's forward and backward, the lr, the gradient norm, the noise
    scale's estimate on log steps, then the update (or, under on_nonfinite=skip, no update)."""
    accelerator, device = loop.accelerator, loop.accelerator.device
    micro_batches = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in micro_batches]
    measure_noise = loop.noise is not None and is_log_step
    totals, global_count, small = _accumulate(loop, micro_batches, measure_noise)
    lr = stage.lr_at(state.stage_step)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    grad_norm = global_norm(p.grad for p in loop.params)
    loss_sum, targets = accelerator.reduce(totals, reduction="sum")
    step_loss = loss_sum / targets.clamp(min=1)
    if measure_noise:
        small_sq, small_units, ranks = accelerator.reduce(small, reduction="sum").tolist()
        if ranks:  # the mean over the ranks that measured one
            loop.noise.add(small_sq / ranks, small_units / ranks, grad_norm.item() ** 2, float(global_count),
                           plan.batch)
            state.noise = loop.noise.state_dict()
    step = Step(state.stage_step, lr, grad_norm, applied=False)
    step.applied, step.update_norm = _update(loop, plan, state, step, step_loss, is_log_step)
    if step.applied:
        state.window["loss"] += step_loss.item()
        state.window["loss_steps"] += 1
    return step


def _accumulate(loop: Loop, micro_batches: list[dict], measure_noise: bool):
    """Forward and backward over the step's micro-batches (the gradient synchronised on the last only):
    (the local [loss sum, targets], the global count that normalises the loss, the noise scale's small batch
    [squared norm, loss units, 1] or None)."""
    task, model, accelerator, parallel = loop.task, loop.model, loop.accelerator, loop.parallel
    world, device = accelerator.num_processes, accelerator.device
    local_count = sum(task.normaliser(mb) for mb in micro_batches)
    global_count = accelerator.reduce(torch.as_tensor(local_count, device=device), reduction="sum").clamp(min=1)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, targets: the logged mean
    small = torch.zeros(3, dtype=torch.float64, device=device) if measure_noise else None
    if measure_noise and len(micro_batches) == 1:
        small = _half_batch_gradient(task, model, micro_batches[0], parallel, accelerator, loop.params)
    for slot, mb in enumerate(micro_batches):
        last = slot == len(micro_batches) - 1
        with contextlib.nullcontext() if last else parallel.no_sync(model), accelerator.autocast():
            out = task.forward(model, mb, slot)
            loss = out["loss_sum"] * (world / global_count)
        accelerator.backward(loss)
        totals[0] += out["loss_sum"].detach().double()
        totals[1] += out["count"]
        if measure_noise and slot == 0 and not last:  # local, not yet all-reduced
            units = float(task.normaliser(mb))
            mean_grad_sq = _grad_sq(loop.params, accelerator) * (float(global_count) / (world * units)) ** 2
            small = torch.tensor([mean_grad_sq, units, 1.0], dtype=torch.float64, device=device)
    return totals, global_count, small


def _update(loop: Loop, plan, state, step: Step, step_loss, is_log_step: bool) -> tuple[bool, float | None]:
    """The non-finite policy and the update: (applied, the update's norm on log steps). A non-finite loss or
    gradient norm stops the run, or under on_nonfinite=skip skips the step; under skip an update that leaves
    a parameter non-finite is undone too (parameters and optimizer state as before it)."""
    cfg, optimizer, params = loop.cfg, loop.optimizer, loop.params
    where = f"at step {state.step} (stage {plan.name}, lr {step.lr:.3g})"
    # Under fp16 the GradScaler owns infinite gradients (it skips the step and lowers the scale).
    finite = torch.isfinite(step_loss) & (torch.isfinite(step.grad_norm) if loop.accelerator.scaler is None else True)
    if not bool(finite):
        _skip(loop, state, f"non-finite {'loss' if not torch.isfinite(step_loss) else 'gradient norm'} {where}: "
              f"loss={step_loss.item()}, grad_norm={step.grad_norm.item()}. Lower the learning rate, lengthen "
              "warmup, enable gradient clipping, or set on_nonfinite=skip to skip such steps")
        return False, None
    before = [p.detach().clone() for p in params] if is_log_step else None
    undo = ([p.detach().clone() for p in params], copy.deepcopy(loop.core_optimizer.state_dict())) \
        if cfg.on_nonfinite == "skip" else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if undo is not None and not bool(torch.isfinite(global_norm(params))):
        with torch.no_grad():
            for p, saved in zip(params, undo[0]):
                p.copy_(saved)
        loop.core_optimizer.load_state_dict(undo[1])
        _skip(loop, state, f"the update {where} left a parameter non-finite: undone")
        return False, None
    state.skipped_in_a_row = 0
    return True, (global_norm([p.detach() - b for p, b in zip(params, before)]).item() if before else None)


def _skip(loop: Loop, state, message: str) -> None:
    """Skip this step (on_nonfinite=skip; up to max_consecutive_skips in a row), else stop the run."""
    cfg = loop.cfg
    if cfg.on_nonfinite != "skip":
        raise NonFiniteError(message)
    state.skipped += 1
    state.skipped_in_a_row += 1
    if state.skipped_in_a_row > cfg.max_consecutive_skips:
        raise NonFiniteError(f"{state.skipped_in_a_row} steps in a row were non-finite (max_consecutive_skips="
                             f"{cfg.max_consecutive_skips}); the run is not recovering. Last: {message}")
    log.warning("skipping step: %s", message)
    loop.optimizer.zero_grad(set_to_none=True)


def _count(state, window: dict, plan, step: Step) -> None:
    state.step += 1
    state.stage_step += 1
    state.samples += plan.batch
    window["steps"] += 1
    window["samples"] += plan.batch


def _log(loop: Loop, plan, stage: Stage, state, window: dict, step: Step, clock: dict) -> dict:
    """The log line of the window that ends at this step; returns the progress bar's postfix."""
    elapsed = time.perf_counter() - clock["window_started"]
    # a batch schedule's phases count the run's epochs; the stages of a multi-stage run count their own
    epoch = step.stage_step / plan.steps_per_epoch + (plan.run_schedule.start_epoch if plan.run_schedule else 0.0)
    metrics = {
        "step": state.step, "stage": plan.name, "epoch": epoch,
        "samples": state.samples, "batch": plan.batch, "lr": step.lr, "grad_norm": step.grad_norm.item(),
        "param_norm": global_norm(loop.params).item(), "samples_per_s": window["samples"] / elapsed,
        "skipped_steps": state.skipped,
    }
    # the mean over the window's steps that were not skipped; none when every one was
    state.last_loss = window["loss"] / window["loss_steps"] if window["loss_steps"] else None
    if state.last_loss is not None:
        metrics["loss"] = state.last_loss
    if stage.tokens_per_sample:
        metrics["tokens_per_s"] = window["samples"] * stage.tokens_per_sample / elapsed
    metrics.update(mfu_metrics(stage.flops_per_sample, metrics["samples_per_s"], loop.accelerator.num_processes,
                               stage.device_name, loop.accelerator.mixed_precision))
    if step.update_norm is not None:
        metrics["update_norm"] = step.update_norm
    metrics.update(trust_ratio_stats(loop.core_optimizer, per_layer=loop.cfg.per_layer_trust_ratios))
    if loop.noise is not None:
        metrics.update(loop.noise.metrics())
    loop.recorder.log(metrics)
    window.update(loss=0.0, loss_steps=0, steps=0, samples=0)
    clock["window_started"] = time.perf_counter()
    return {"loss": f"{metrics.get('loss', math.nan):.3f}", "lr": f"{step.lr:.2e}"}


def _evaluate(loop: Loop, plan, state, clock: dict) -> None:
    started = time.perf_counter()
    with loop.parallel.evaluation(loop.model):
        state.last_eval = loop.task.evaluate(loop.model, loop.accelerator, plan)
    loop.recorder.log({"step": state.step, "stage": plan.name, "samples": state.samples, **state.last_eval})
    clock["window_started"] += time.perf_counter() - started


def _reached_target(loop: Loop, state, elapsed_s: float) -> bool:
    """stop_at: has the last evaluation reached the target (>= where higher is better, else <=)? Records
    when (step, samples, seconds) in ``loop.target`` for the summary."""
    cfg = loop.cfg
    if cfg.stop_at is None:
        return False
    metric, higher = target_metric(cfg, loop.task)
    value = (state.last_eval or {}).get(metric)
    if value is None or not math.isfinite(value) or (value < cfg.stop_at if higher else value > cfg.stop_at):
        return False
    loop.target.update(reached=True, value=value, step=state.step, samples=state.samples, wall_time_s=elapsed_s)
    log.info("stop_at: %s = %.4g reached %g at step %d: the run ends here", metric, value, cfg.stop_at, state.step)
    return True


def target_metric(cfg, task) -> tuple[str, bool]:
    """(the metric stop_at reads, whether higher is better): the task's primary unless stop_metric names
    another (loss and perplexity: lower is better; any other: higher)."""
    if cfg.stop_metric is None or cfg.stop_metric == task.primary.name:
        return task.primary.name, task.primary.higher_is_better
    return cfg.stop_metric, cfg.stop_metric.rsplit("/", 1)[-1] not in ("loss", "ppl")


def _checkpoint_or_stop(loop: Loop, plan, stage: Stage, state, stop, save) -> None:
    """A checkpoint on its period, and on a stop signal (then :class:`Interrupted`), unless the run is done."""
    more = state.stage_index < loop.stages
    stop_now = _any_rank(loop.accelerator, stop.signum is not None) and more
    if stop_now or (stage.checkpoint_every and _crossed(state.samples, plan.batch, stage.checkpoint_every) and more):
        saved = save()
        if stop_now:
            raise Interrupted(f"stopped by a signal at step {state.step}; checkpoint {saved}", state.step,
                              stop.signum or signal.SIGTERM)


def _finish(loop: Loop, plans, state, run_dir: Path, wall: float, save) -> dict:
    """The final evaluation, the summary (written before the last checkpoint: a full disk there must not lose
    a finished run), the last checkpoint and the exported model."""
    cfg, accelerator, task, model = loop.cfg, loop.accelerator, loop.task, loop.model
    with loop.parallel.evaluation(model):  # not part of the training time
        final_eval = task.final_evaluate(model, accelerator, plans[-1], run_dir) if cfg.final_eval else {}
    if final_eval:
        loop.recorder.log({"step": state.step, "stage": plans[-1].name, "samples": state.samples, **final_eval})
    summary = {"steps": state.step, "samples": state.samples, "skipped_steps": state.skipped, "wall_time_s": wall,
               "samples_per_s": state.samples / wall, "world_size": accelerator.num_processes,
               "optimizer": cfg.optimizer.name, "precision": accelerator.mixed_precision,
               "batch": plans[-1].batch, "final_loss": state.last_loss, "primary_metric": task.primary.name,
               **(state.last_eval or {}), **final_eval}
    if cfg.stop_at is not None:  # steps, samples and seconds to the target, or that it was never reached
        metric, _ = target_metric(cfg, task)
        summary["stop_at"] = {"metric": metric, "target": cfg.stop_at, "reached": False, **loop.target}
    loop.recorder.summary(summary)
    if cfg.save_checkpoint:
        save()
        exported = loop.parallel.exportable(model, task)  # every rank: FSDP2 gathers the shards
        if accelerator.is_main_process:
            with atomic_dir(run_dir / runfolder.MODEL) as folder:
                task.save_model(exported, folder)
    if accelerator.is_main_process:
        log.info("done in %.1f s: %s", wall, {k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in summary.items()})
    return summary


def _grad_sq(params, accelerator) -> float:
    """Squared norm of the accumulated gradients, unscaled under fp16's loss scaling."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return math.nan
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
    return (global_norm(grads).item() / scale) ** 2


def _half_batch_gradient(task, model, micro_batch, parallel, accelerator, params) -> torch.Tensor:
    """The noise scale's small batch when a step has a single micro-batch: the mean gradient over the
    first half of it, computed apart (no gradient sync, a forked RNG, the task's state untouched) and
    discarded. Returns [squared norm, loss units, 1], or zeros where the micro-batch cannot be halved."""
    device = accelerator.device
    half = task.half_batch(micro_batch)
    if half is None:
        return torch.zeros(3, dtype=torch.float64, device=device)
    units = float(task.normaliser(half))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), parallel.no_sync(model):
        with accelerator.autocast():
            out = task.probe_forward(model, half, 0)
        accelerator.backward(out["loss_sum"] / max(units, 1.0))
    mean_grad_sq = _grad_sq(params, accelerator)
    for p in params:
        p.grad = None
    return torch.tensor([mean_grad_sq, units, 1.0], dtype=torch.float64, device=device)


def _crossed(samples: int, batch: int, every: int) -> bool:
    """Did the last step (of ``batch`` samples) cross a multiple of ``every`` samples?"""
    return samples // every > (samples - batch) // every


def _any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item())
