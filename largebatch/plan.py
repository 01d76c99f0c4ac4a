"""The run plan: every derived quantity of a run, computed before anything trains.

``lb-plan`` prints it, ``lb-train`` logs it and follows it. A run is a list of stages (one unless
``stages`` is set); each stage resolves its batch, micro-batch, accumulation, steps, peak lr and
warmup from the config, the scaling rule and the training-set size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from largebatch.errors import ConfigError
from largebatch.sched import Scaled, apply_scaling, build_schedule, epochs_to_steps, steps_per_epoch

DEFAULT_MICRO_BATCH = 64


@dataclass(frozen=True)
class StageSpec:
    """A stage as configured, before the data size is known."""

    name: str
    batch: int
    micro_batch: int | None
    seq_len: int
    epochs: float
    lr: float | None  # explicit peak lr (skips the scaling rule)
    warmup_epochs: float | None  # explicit warmup (skips the scaling rule)


@dataclass(frozen=True)
class StagePlan:
    name: str
    batch: int
    micro_batch: int
    world_size: int
    accumulation: int
    seq_len: int
    train_samples: int
    epochs: float
    steps_per_epoch: int
    total_steps: int
    lr: float
    warmup_epochs: float
    warmup_steps: int
    scaling_rule: str
    k: float

    def as_dict(self) -> dict:
        return asdict(self)


def stage_specs(cfg) -> list[StageSpec]:
    """The configured stages; with ``stages: []`` the top-level keys make the single stage."""
    top = StageSpec("main", cfg.batch, cfg.micro_batch, cfg.data.seq_len, cfg.epochs, None, None)
    if not cfg.stages:
        return [top]
    specs = []
    for i, st in enumerate(cfg.stages):
        if st.epochs is not None and st.fraction is not None:
            raise ConfigError(f"stages[{i}] sets both epochs and fraction; keep one")
        epochs = st.epochs if st.epochs is not None else (st.fraction if st.fraction is not None else 1.0) * cfg.epochs
        warmup = st.warmup_epochs
        if st.warmup_fraction is not None:
            if warmup is not None:
                raise ConfigError(f"stages[{i}] sets both warmup_epochs and warmup_fraction; keep one")
            warmup = st.warmup_fraction * epochs
        specs.append(StageSpec(
            name=st.name or f"stage{i}",
            batch=st.batch if st.batch is not None else cfg.batch,
            micro_batch=st.micro_batch if st.micro_batch is not None else cfg.micro_batch,
            seq_len=st.seq_len if st.seq_len is not None else cfg.data.seq_len,
            epochs=epochs, lr=st.lr, warmup_epochs=warmup,
        ))
    return specs


def resolve_micro_batch(batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) for a GLOBAL batch; refuses splits that do not divide exactly.

    A micro-batch larger than a rank's share of the batch is lowered to that share (a small batch
    needs no accumulation)."""
    if batch < world_size:
        raise ConfigError(f"batch={batch} is smaller than the world size {world_size}; use batch >= {world_size}")
    micro = min(micro_batch or DEFAULT_MICRO_BATCH, batch // world_size)
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
    spe = steps_per_epoch(train_samples, spec.batch)
    total = epochs_to_steps(spec.epochs, spe)
    scaled: Scaled = apply_scaling(
        cfg.scaling.rule, batch=spec.batch, ref_batch=cfg.scaling.ref_batch,
        ref_lr=cfg.scaling.ref_lr, ref_warmup_epochs=cfg.scaling.ref_warmup_epochs,
    )
    lr = spec.lr if spec.lr is not None else scaled.lr
    warmup_epochs = spec.warmup_epochs if spec.warmup_epochs is not None else scaled.warmup_epochs
    warmup_steps = epochs_to_steps(warmup_epochs, spe)
    if warmup_steps > total:
        raise ConfigError(
            f"stage {spec.name!r}: warmup ({warmup_steps} steps = {warmup_epochs:g} epochs, rule "
            f"{cfg.scaling.rule}) is longer than the run ({total} steps = {spec.epochs:g} epochs at batch "
            f"{spec.batch}); lower schedule.warmup_epochs or train for more epochs"
        )
    return StagePlan(
        name=spec.name, batch=spec.batch, micro_batch=micro, world_size=world_size,
        accumulation=accumulation, seq_len=spec.seq_len, train_samples=train_samples,
        epochs=spec.epochs, steps_per_epoch=spe, total_steps=total, lr=lr,
        warmup_epochs=warmup_epochs, warmup_steps=warmup_steps, scaling_rule=cfg.scaling.rule, k=scaled.k,
    )


def lr_schedule(schedule_cfg, plan: StagePlan):
    """lr(step) of one stage: the schedule restarts, with its own warmup, at every stage."""
    s = schedule_cfg
    return build_schedule(
        s.name, peak_lr=plan.lr, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps,
        steps_per_epoch=plan.steps_per_epoch, warmup_init_lr=s.warmup_init_lr, power=s.power, end_lr=s.end_lr,
        gamma=s.gamma, milestones=tuple(s.milestones), decay_start_epoch=s.decay_start_epoch,
    )


def format_plan(plans: list[StagePlan], header: dict | None = None) -> str:
    """A fixed-width table, one row per stage (or per batch of a ladder)."""
    lines = [f"{k}: {v}" for k, v in (header or {}).items()]
    cols = ["name", "batch", "micro_batch", "world_size", "accumulation", "seq_len", "train_samples",
            "steps_per_epoch", "epochs", "total_steps", "lr", "warmup_epochs", "warmup_steps"]
    rows = [[_fmt(getattr(p, c)) for c in cols] for p in plans]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
