"""Command-line entry points.

    lb-train [overrides]          train (Hydra; `-m` sweeps, e.g. `lb-train -m batch=512,1024`)
    lb-plan  [overrides] [--json] [--plot PNG] [--world-size N] [--gpu-memory GiB] [--optimizers]
                                  print the derived quantities of a run without training, and its
                                  per-device memory; a comma list (batch=512,1024,2048) prints one
                                  row per value
Errors the user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from largebatch.config import CONF_DIR, compose, register_configs, validate
from largebatch.errors import LargebatchError, fail
from largebatch.runfolder import FAILED, STATUS

log = logging.getLogger("largebatch")

register_configs()


# ---------------------------------------------------------------------------- lb-train
def _set_run_stamp() -> None:
    """One output folder name for all ranks: rank 0's clock, broadcast before Hydra picks the folder."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list

        PartialState(cpu=not torch.cuda.is_available())
        stamp = broadcast_object_list([stamp])[0]
    os.environ["LB_RUN_STAMP"] = stamp


_FAILED_JOBS: list[tuple[str, str]] = []  # (run folder, reason) of the sweep jobs that failed


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _train_task(cfg: DictConfig):
    from largebatch.checkpoint import Interrupted
    from largebatch.train import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except Interrupted as interrupted:
        print(f"interrupted: {interrupted}. Continue with the same command plus resume=auto "
              f"hydra.run.dir={run_dir}", file=sys.stderr)
        raise SystemExit(interrupted.exit_code) from None
    except Exception as error:
        _record_refusal(run_dir, cfg, error)
        if hydra_cfg.mode.name != "MULTIRUN":
            if isinstance(error, LargebatchError):
                fail(error)
            raise
        # A sweep goes on: the job's folder and the log say why it failed; the CLI exits non-zero at the end.
        reason = f"{type(error).__name__}: {error}"
        log.error("sweep job %s failed: %s", run_dir, reason, exc_info=not isinstance(error, LargebatchError))
        _FAILED_JOBS.append((str(run_dir), reason))
        if "SUBMITIT_EXECUTOR" in os.environ:  # a job of its own: fail it, so the launching lb-train exits 1
            raise
        return None
    return summary.get(summary["primary_metric"])  # what a Hydra sweeper optimises


def _record_refusal(run_dir: Path, cfg, error: Exception) -> None:
    """A command refused before its run wrote anything leaves its reason (and its config) in the folder Hydra
    created for it, so lb-report can list why; a folder that holds another run is never touched."""
    from largebatch.fileio import atomic_write_json
    from largebatch.tracking import write_hydra_records

    # only the folder Hydra made for this command: empty but for Hydra's log of the command (cli.log)
    if not run_dir.is_dir() or any(p.suffix != ".log" for p in run_dir.iterdir()):
        return
    try:
        write_hydra_records(run_dir, cfg)
        atomic_write_json(run_dir / STATUS, {"status": FAILED, "error": f"{type(error).__name__}: {error}"})
    except OSError:
        pass  # a folder that cannot be written: the error line still says why


def scale_settings(cfg) -> str:
    """What ``scale=<name>`` sets for this model and dataset, in one line: the keys of the two preset files the
    scale selects (``conf/scale_preset/<model>_<scale>.yaml``, ``conf/data_preset/<data>_<scale>.yaml`` where it
    exists), each with its file."""
    from omegaconf import OmegaConf

    from largebatch.config import CONF_DIR
    from largebatch.report.runs import flatten_config

    parts = []
    for group, name in (("scale_preset", cfg.model.name), ("data_preset", cfg.data.name)):
        path = CONF_DIR / group / f"{name}_{cfg.scale}.yaml"
        if path.is_file():
            keys = flatten_config(OmegaConf.to_container(OmegaConf.load(path)))
            parts.append(f"{path.relative_to(CONF_DIR.parent)}: " + ", ".join(f"{k}={v}" for k, v in keys.items()))
    return "; ".join(parts) or "nothing beyond the defaults"


def _check_output_dirs(argv: list[str]) -> None:
    """Hydra creates the run folder before the run starts: refuse one that cannot be created, in one line."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            existing = Path(value).absolute()
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir() or not os.access(existing, os.W_OK):
                fail(f"{key}={value} cannot be created ({existing} is not a writable folder); choose another")


def check_batch_schedule_chosen(overrides: list[str]) -> None:
    """``batch_schedule.KEY=...`` while no batch schedule is chosen (the group is null by default) would end in
    Hydra's AssertionError: say what to add instead, in one line."""
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    if not any(k.startswith("batch_schedule.") for k in keys) or "batch_schedule" in keys:
        return
    rest = [o for o, k in zip(overrides, keys) if not k.startswith(("batch_schedule.", "hydra.")) and "=" in o]
    try:
        chosen = compose(rest).get("batch_schedule") is not None  # an experiment may choose one
    except Exception:  # noqa: BLE001 - another problem: composing the whole command reports it
        return
    if not chosen:
        from largebatch.errors import ConfigError

        raise ConfigError("batch_schedule.<key>=... sets a key of a batch schedule, but none is chosen: add "
                          "batch_schedule=linear or batch_schedule=step")


def train_main() -> None:
    _check_output_dirs(sys.argv[1:])
    try:
        check_batch_schedule_chosen(sys.argv[1:])
    except LargebatchError as error:
        fail(error)
    _set_run_stamp()
    _train_task()
    if _FAILED_JOBS:
        lines = "\n".join(f"  {folder}: {reason.splitlines()[0]}" for folder, reason in _FAILED_JOBS)
        print(f"error: {len(_FAILED_JOBS)} sweep job(s) failed (each folder's status.json has the reason):\n"
              f"{lines}", file=sys.stderr)
        raise SystemExit(1)


# ---------------------------------------------------------------------------- lb-plan
def _expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """`batch=512,1024 optimizer=lamb` -> [[batch=512, optimizer=lamb], [batch=1024, optimizer=lamb]]."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def meta_model(task):
    import torch

    with torch.device("meta"):  # shapes only: no memory, no init time, even for BERT-large
        return task.build_model()


def count_parameters(task) -> int:
    return sum(p.numel() for p in meta_model(task).parameters())


def memory_rows(rows, gpu_memory: float | None) -> list[dict]:
    """Per stage of every row: the per-device memory estimate (largebatch.memory), in bytes, and whether
    it fits ``gpu_memory`` GiB ("unknown" when it fits without activations the model has no formula for)."""
    from largebatch import memory
    from largebatch.config import optimizer_options
    from largebatch.distributed import largest_unit

    out, models = [], {}
    for cfg, plans, task in rows:
        key = str(cfg.model)
        if key not in models:
            model = meta_model(task)
            models[key] = (sum(p.numel() for p in model.parameters()), largest_unit(model),
                           memory.transformer_shape(model))
        parameters, unit, shape = models[key]
        states = memory.state_tensors_per_parameter(cfg.optimizer.name, **{
            k: v for k, v in optimizer_options(cfg.optimizer).items() if k != "implementation"})
        for p in plans:
            activations = None
            if shape is not None and p.seq_len:
                activations = memory.transformer_activation_bytes(
                    shape, p.seq_len, p.micro_batch, 4 if cfg.precision == "no" else 2,
                    masked_fraction=cfg.data.get("mlm_probability"))
            estimate = memory.estimate(parameters=parameters, largest_unit=unit, state_tensors=states,
                                       world_size=p.world_size, sharded=cfg.sharding == "fsdp2",
                                       accumulation=p.accumulation, activations=activations)
            row = {"name": p.name, "batch": p.batch, "micro_batch": p.micro_batch, "world_size": p.world_size,
                   "sharding": cfg.sharding, "precision": cfg.precision, **estimate.as_dict()}
            if gpu_memory is not None:
                fits = estimate.total <= gpu_memory * memory.GIB
                row["fits"] = ("yes" if activations is not None else "unknown") if fits else "no"
            out.append(row)
    return out


def format_memory(rows: list[dict], gpu_memory: float | None) -> str:
    from largebatch.memory import GIB

    sizes = ["parameters", "gradients", "optimizer_state", "gathered", "activations", "total"]
    cols = ["name", "batch", "micro_batch", "world_size", "sharding", "precision", *sizes]
    cols += ["fits"] if gpu_memory is not None else []
    table = [[("?" if row[c] is None else f"{row[c] / GIB:.2f}") if c in sizes else str(row[c]) for c in cols]
             for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(cols)]
    where = f" against {gpu_memory:g} GiB" if gpu_memory is not None else ""
    lines = [f"memory per device, GiB{where} (an estimate: largebatch/memory.py says what it counts; "
             "? = no activation formula for this model)"]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def plan_rows(overrides: list[str], world_size: int) -> list[tuple[DictConfig, list, object]]:
    """(config, stage plans, task) for every combination of a sweep's values."""
    from largebatch.plan import build_plans
    from largebatch.tasks import build_task

    rows = []
    for combo in _expand_sweeps(overrides):
        check_batch_schedule_chosen(combo)
        cfg = compose(combo)
        validate(cfg)  # lb-train's checks (largebatch.train.train), before the task is built
        task = build_task(cfg)
        rows.append((cfg, build_plans(cfg, task, world_size, allow_declared=True), task))
    return rows


def plan_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lb-plan", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for lb-train; a,b,c lists expand to rows")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="write the lr schedules of all rows to this PNG")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                        help="number of processes the run will use (default: $WORLD_SIZE or 1)")
    parser.add_argument("--gpu-memory", type=float, metavar="GiB",
                        help="memory of one device: the memory table says whether the run fits")
    parser.add_argument("--optimizers", action="store_true",
                        help="list every optimizer of the registry and what each variant changes, then exit")
    args = parser.parse_intermixed_args(argv)
    if args.optimizers:
        from largebatch.optim import describe_optimizers

        print(describe_optimizers())
        return
    if args.world_size < 1:
        fail(f"--world-size must be at least 1, got {args.world_size}")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        fail(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    logging.basicConfig(level=logging.WARNING)
    try:
        rows = plan_rows(args.overrides, args.world_size)
    except (LargebatchError, HydraException, OmegaConfBaseException) as error:
        fail(error)

    from largebatch.plan import format_plan

    cfg0, _, task0 = rows[0]
    memory = memory_rows(rows, args.gpu_memory)
    if args.json:
        stages = [(cfg, p) for cfg, plans, _ in rows for p in plans]
        for (cfg, p), mem in zip(stages, memory):
            print(json.dumps({"optimizer": cfg.optimizer.name, "scaling": cfg.scaling.rule,
                              "schedule": cfg.schedule.name, **p.as_dict(), "memory": mem}))
    else:
        described = task0.describe()
        header = {
            "model": f"{described.pop('model')} ({count_parameters(task0) / 1e6:.2f}M parameters)",
            **described,
            "optimizer": f"{cfg0.optimizer.name} (ref lr {cfg0.scaling.ref_lr:g} at batch {cfg0.scaling.ref_batch})",
            "scaling": cfg0.scaling.rule, "schedule": cfg0.schedule.name, "world_size": args.world_size,
            f"scale={cfg0.scale} sets": scale_settings(cfg0),
        }
        print(format_plan([p for _, plans, _ in rows for p in plans], header))
        print()
        print(format_memory(memory, args.gpu_memory))
    if args.plot:
        from largebatch.plan import lr_schedule
        from largebatch.sched.plot import plot_planned_lr

        curves = []
        for cfg, plans, _ in rows:
            lrs, samples = [], []
            for p in plans:
                lr_at = lr_schedule(cfg.schedule, p)
                lrs += [lr_at(i) for i in range(p.total_steps)]
                before = samples[-1] if samples else 0
                samples += [before + p.batch * (i + 1) for i in range(p.total_steps)]
            curves.append({"label": f"{cfg.optimizer.name} batch {plans[0].batch}", "lrs": lrs, "samples": samples})
        plot_planned_lr(curves, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == "__main__":  # `python -m largebatch.cli` (torchrun / accelerate launch)
    train_main()
