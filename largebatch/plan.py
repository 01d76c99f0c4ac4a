"""The run plan: every derived quantity of a run, computed before anything trains.

``lb-plan`` prints it, ``lb-train`` logs it and follows it; both get it from :func:`build_plans`. A run
is a list of stages (one unless ``stages`` is set); each stage resolves its batch, micro-batch,
accumulation, steps, peak lr and warmup from the config, the scaling rule and the task's count of
samples in an epoch at that batch (a stateful LM's count depends on the batch: its streams).

A batch schedule (``batch_schedule``: the batch grows during the run) is planned as stages too, one a phase,
with one difference: the phases share ONE lr schedule over the run (one warmup, one decay, milestones in the
run's epochs), where the stages of a multi-stage run restart theirs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from largebatch.errors import ConfigError
from largebatch.sched import (
    Scaled,
    apply_scaling,
    batch_phases,
    build_schedule,
    epochs_to_steps,
    steps_per_epoch,
)

DEFAULT_MICRO_BATCH = 64


@dataclass(frozen=True)
class RunSchedule:
    """Where a phase of a batch schedule sits in the lr schedule its phases share."""

    start_epoch: float  # the run's epoch at which the phase starts ...
    end_epoch: float  # ... and ends: its steps are those of the run between the two, at its batch
    epochs: float  # the run's epochs: the schedule's length
    warmup_epochs: float  # the run's warmup (at its start)


@dataclass(frozen=True)
class StageSpec:
    """A stage as configured, before the data size is known."""

    name: str
    batch: int
    micro_batch: int | None
    seq_len: int | None  # None: the task has no sequence length
    epochs: float
    lr: float | None  # explicit peak lr (skips the scaling rule)
    warmup_epochs: float | None  # explicit warmup (skips the scaling rule)
    run_schedule: RunSchedule | None = None  # a phase of a batch schedule; None: a stage with its own schedule


@dataclass(frozen=True)
class StagePlan:
    name: str
    batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    seq_len: int | None
    train_samples: int
    epochs: float
    steps_per_epoch: int
    total_steps: int
    samples: int  # total_steps x batch
    lr: float
    warmup_epochs: float  # of this stage (a phase: the part of the run's warmup that falls in it)
    warmup_steps: int
    scaling_rule: str
    k: float
    tokens_per_step: int | None  # batch x seq_len (an LM: streams x BPTT window); None without a sequence
    run_schedule: RunSchedule | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def stage_specs(cfg, default_seq_len: int | None) -> list[StageSpec]:
    """The configured stages; with ``stages: []`` the top-level keys make the single stage.
    ``default_seq_len`` is the task's (BERT: data.seq_len; the LSTM LM: its BPTT window)."""
    if cfg.get("batch_schedule") is not None:
        return phase_specs(cfg, default_seq_len)
    top = StageSpec("main", cfg.batch, cfg.micro_batch, default_seq_len, cfg.epochs, None, None)
    if not cfg.stages:
        return [top]
    specs = []
    for i, stage in enumerate(cfg.stages):
        if stage.epochs is not None and stage.fraction is not None:
            raise ConfigError(f"stages[{i}] sets both epochs and fraction; keep one")
        fraction = stage.fraction if stage.fraction is not None else 1.0
        epochs = stage.epochs if stage.epochs is not None else fraction * cfg.epochs
        warmup = stage.warmup_epochs
        if stage.warmup_fraction is not None:
            if warmup is not None:
                raise ConfigError(f"stages[{i}] sets both warmup_epochs and warmup_fraction; keep one")
            warmup = stage.warmup_fraction * epochs
        specs.append(StageSpec(
            name=stage.name or f"stage{i}",
            batch=stage.batch if stage.batch is not None else cfg.batch,
            micro_batch=stage.micro_batch if stage.micro_batch is not None else cfg.micro_batch,
            seq_len=stage.seq_len if stage.seq_len is not None else default_seq_len,
            epochs=epochs, lr=stage.lr, warmup_epochs=warmup,
        ))
    return specs


def phase_specs(cfg, seq_len: int | None) -> list[StageSpec]:
    """The phases of ``cfg.batch_schedule`` as stages of one lr schedule. Its warmup is the scaling rule's at
    ``batch``; its peak lr too under ``lr_rule=hold``, or the rule's at each phase's batch under ``scale``."""
    schedule = cfg.batch_schedule
    phases = batch_phases(schedule.name, batch=cfg.batch, epochs=cfg.epochs, start_batch=schedule.start_batch,
                          increment=schedule.increment, ramp_epochs=schedule.ramp_epochs,
                          milestones=schedule.milestones, factor=schedule.factor)
    at_batch = apply_scaling(cfg.scaling.rule, batch=cfg.batch, ref_batch=cfg.scaling.ref_batch,
                             ref_lr=cfg.scaling.ref_lr, ref_warmup_epochs=cfg.scaling.ref_warmup_epochs)
    return [StageSpec(name=f"batch{p.batch}", batch=p.batch, micro_batch=cfg.micro_batch, seq_len=seq_len,
                      epochs=p.epochs, lr=at_batch.lr if schedule.lr_rule == "hold" else None,
                      warmup_epochs=at_batch.warmup_epochs,
                      run_schedule=RunSchedule(p.start_epoch, p.end_epoch, cfg.epochs, at_batch.warmup_epochs))
            for p in phases]


def build_plans(cfg, task, world_size: int, *, allow_declared: bool = False) -> list[StagePlan]:
    """Every stage's plan, for lb-plan and lb-train alike (both have run ``largebatch.config.validate`` on
    ``cfg`` before building the task). ``allow_declared`` lets a declared ``data.train_samples`` stand in for
    the data (lb-plan at paper scale); training always counts."""
    plans, specs = [], stage_specs(cfg, task.default_seq_len())
    for spec in specs:
        try:  # refuse a bad split before loading data
            resolve_micro_batch(spec.batch, spec.micro_batch, world_size)
        except ConfigError:
            if spec.run_schedule is None:
                raise
            micro = min(DEFAULT_MICRO_BATCH if spec.micro_batch is None else spec.micro_batch, spec.batch // world_size)
            common = math.gcd(*(s.batch for s in specs))
            fix = f"micro_batch={common // world_size} splits every phase" if common % world_size == 0 else \
                f"choose batches that are multiples of world_size={world_size}"
            raise ConfigError(f"batch_schedule: phase {spec.name} (batch {spec.batch}) does not divide into "
                              f"micro_batch={micro} x world_size={world_size}: every phase's batch must be a multiple "
                              f"of micro_batch x world_size; {fix}") from None
        samples = task.train_samples(spec.batch, spec.seq_len, allow_declared=allow_declared)
        plans.append(plan_stage(cfg, spec, samples, world_size))
        virtual = cfg.model.get("bn_virtual_batch")
        if virtual and plans[-1].micro_batch % virtual:
            raise ConfigError(f"model.bn_virtual_batch={virtual} does not divide the micro-batch "
                              f"{plans[-1].micro_batch} of stage {plans[-1].name}: choose a divisor of it, or a "
                              f"micro_batch that {virtual} divides")
    return plans


def resolve_micro_batch(batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) for a GLOBAL batch; refuses splits that do not divide exactly.

    A micro-batch larger than a rank's share of the batch is lowered to that share (a small batch
    needs no accumulation)."""
    if batch < world_size:
        raise ConfigError(f"batch={batch} is smaller than the world size {world_size}; use batch >= {world_size}")
    micro = min(DEFAULT_MICRO_BATCH if micro_batch is None else micro_batch, batch // world_size)
    if batch % (micro * world_size):
        per_rank = batch // world_size
        divisors = [d for d in range(micro, 0, -1) if per_rank % d == 0 and batch % world_size == 0]
        hint = f"set micro_batch={divisors[0]}" if divisors else f"use a batch divisible by {world_size}"
        raise ConfigError(
            f"batch={batch} does not divide into micro_batch={micro} x world_size={world_size} = "
            f"{micro * world_size} samples per accumulation step; choose batch as a multiple of "
            f"{micro * world_size}, or {hint}"
        )
    return micro, batch // (micro * world_size)


def plan_stage(cfg, spec: StageSpec, train_samples: int, world_size: int) -> StagePlan:
    micro, accumulation = resolve_micro_batch(spec.batch, spec.micro_batch, world_size)
    per_epoch = steps_per_epoch(train_samples, spec.batch)
    total = epochs_to_steps(spec.epochs, per_epoch)
    run = spec.run_schedule
    if run is not None:  # rounded at the phase's ends, so that the phases tile the run's schedule
        total = epochs_to_steps(run.end_epoch, per_epoch) - epochs_to_steps(run.start_epoch, per_epoch)
        if total < 1:
            raise ConfigError(f"batch_schedule: phase {spec.name} ({spec.epochs:.4g} epochs at {per_epoch} steps an "
                              "epoch) has no step; lengthen the ramp or the phases")
    scaled: Scaled = apply_scaling(
        cfg.scaling.rule, batch=spec.batch, ref_batch=cfg.scaling.ref_batch,
        ref_lr=cfg.scaling.ref_lr, ref_warmup_epochs=cfg.scaling.ref_warmup_epochs,
    )
    lr = spec.lr if spec.lr is not None else scaled.lr
    warmup_epochs = spec.warmup_epochs if spec.warmup_epochs is not None else scaled.warmup_epochs
    warmup_steps = epochs_to_steps(warmup_epochs, per_epoch)
    schedule_steps = total if run is None else epochs_to_steps(run.epochs, per_epoch)
    if warmup_steps > schedule_steps:
        raise ConfigError(
            f"stage {spec.name!r}: warmup ({warmup_steps} steps = {warmup_epochs:g} epochs, rule "
            f"{cfg.scaling.rule}) is longer than the run ({schedule_steps} steps = "
            f"{spec.epochs if run is None else run.epochs:g} epochs at batch {spec.batch}); lower "
            "schedule.warmup_epochs or train for more epochs"
        )
    if run is not None:  # the part of the run's warmup that falls in this phase
        offset = epochs_to_steps(run.start_epoch, per_epoch)
        warmup_steps = min(total, max(0, warmup_steps - offset))
        warmup_epochs = min(spec.epochs, max(0.0, run.warmup_epochs - run.start_epoch))
    return StagePlan(
        name=spec.name, batch=spec.batch, micro_batch=micro, world_size=world_size,
        accumulation=accumulation, seq_len=spec.seq_len, train_samples=train_samples,
        epochs=spec.epochs, steps_per_epoch=per_epoch, total_steps=total, samples=total * spec.batch, lr=lr,
        warmup_epochs=warmup_epochs, warmup_steps=warmup_steps, scaling_rule=cfg.scaling.rule, k=scaled.k,
        tokens_per_step=spec.batch * spec.seq_len if spec.seq_len else None, run_schedule=run,
    )


def lr_schedule(schedule_cfg, plan: StagePlan):
    """lr(step) of one stage: the schedule restarts, with its own warmup, at every stage. A phase of a batch
    schedule continues the run's one schedule instead: its step s is step offset + s of the whole run
    planned at this phase's batch (offset: the steps of the epochs before the phase, at this batch)."""
    schedule, run = schedule_cfg, plan.run_schedule
    total, warmup, offset = plan.total_steps, plan.warmup_steps, 0
    if run is not None:
        total, warmup, offset = (epochs_to_steps(e, plan.steps_per_epoch)
                                 for e in (run.epochs, run.warmup_epochs, run.start_epoch))
    lr_at = build_schedule(
        schedule.name, peak_lr=plan.lr, total_steps=total, warmup_steps=warmup,
        steps_per_epoch=plan.steps_per_epoch, warmup_init_lr=schedule.warmup_init_lr, power=schedule.power,
        end_lr=schedule.end_lr, gamma=schedule.gamma, milestones=tuple(schedule.milestones),
        decay_start_epoch=schedule.decay_start_epoch,
    )
    return lr_at if not offset else lambda step: lr_at(offset + step)


def format_plan(plans: list[StagePlan], header: dict | None = None) -> str:
    """A fixed-width table, one row per stage (or per batch of a ladder)."""
    lines = [f"{k}: {v}" for k, v in (header or {}).items()]
    cols = ["name", "batch", "micro_batch", "world_size", "accumulation", "seq_len", "tokens_per_step", "train_samples",
            "steps_per_epoch", "epochs", "total_steps", "samples", "lr", "warmup_epochs", "warmup_steps"]
    rows = [[_fmt(getattr(p, c)) for c in cols] for p in plans]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
