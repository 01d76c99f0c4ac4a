"""lb-plan and lb-train accept and refuse the same configs, with the same one-line message, before anything is
built: both run ``largebatch.config.validate`` first. In-process (no subprocess per message): the step after
validation, building the task (lb-plan) or the accelerator (lb-train), is replaced by a sentinel."""

from __future__ import annotations

import pytest

from largebatch import cli
from largebatch import train as train_module
from largebatch.config import compose
from largebatch.errors import LargebatchError


class Built(Exception):
    """The entry point went past validation and started building."""


def _built(*args, **kwargs):
    raise Built


def plan_outcome(overrides: list[str], monkeypatch) -> str | None:
    """None if lb-plan's path (cli.plan_rows) gets to building the task, else its error message."""
    monkeypatch.setattr("largebatch.tasks.build_task", _built)
    try:
        cli.plan_rows(overrides, world_size=1)
    except Built:
        return None
    except LargebatchError as error:
        return str(error)
    raise AssertionError("lb-plan built no task")


def train_outcome(overrides: list[str], monkeypatch, run_dir) -> str | None:
    """None if lb-train's path (largebatch.train.train, as cli._train_task calls it) gets to building the
    accelerator, else its error message."""
    monkeypatch.setattr(train_module, "make_accelerator", _built)
    try:
        train_module.train(compose(overrides), run_dir)
    except Built:
        return None
    except LargebatchError as error:
        return str(error)
    raise AssertionError("lb-train built no accelerator")


@pytest.mark.parametrize(("overrides", "message"), [
    # new: each of these used to end in a traceback (lb-train) or pass (lb-plan)
    (["precision=fp8"], "precision='fp8' is not one of auto | no | bf16 | fp16"),
    (["optimizer.name=foo"], "optimizer.name='foo' is unknown; choose one of lamb | lamb_v3"),
    (["+optimizer.foo=1"], "optimizer 'adamw' does not take optimizer.foo; remove it, or set one of its options: betas"),
    (["optimizer=lamb", "optimizer.mode=larc"], "optimizer 'lamb' does not take optimizer.mode"),
    (["schedule.name=triangle"], "unknown schedule 'triangle'; choose one of constant, linear, poly, cosine"),
    (["model.name=gpt"], "model.name='gpt' is unknown; choose one of bert | lstm_lm | lstm_classifier | resnet"),
    (["model.name=resnet"], "does not match the model config (bert); choose the model with model=resnet"),
    (["scaling.rule=cubic"], "unknown scaling rule 'cubic'; choose one of none, linear, sqrt, legw"),
    (["schedule=step", "schedule.gamma=2"], "schedule.gamma must be in (0, 1]"),
    (["batch_schedule=step"], "batch_schedule=step needs batch_schedule.milestones"),
    (["batch_schedule=linear", "batch_schedule.start_batch=8", "batch_schedule.increment=5",
      "batch_schedule.ramp_epochs=0.5"], "batch_schedule.increment=5 must be > 0 and divide batch - start_batch"),
    # validated before this change
    (["eval_batch=0"], "eval_batch=0 must be an integer > 0"),
    (["on_nonfinite=skipp"], "on_nonfinite='skipp' is not one of stop | skip"),
    (["+optimiser=lamb"], "unknown config key 'optimiser'"),
    (["log_every=0"], "log_every=0"),
    (["micro_batch=-4"], "micro_batch=-4"),
    (["micro_batch=0"], "micro_batch=0"),
    (["checkpoint_every_epochs=0"], "checkpoint_every_epochs=0"),
    # good configs: both go on to build
    ([], None),
    (["optimizer=lamb"], None),
    (["optimizer=sgd"], None),
    (["batch_schedule=step", "batch_schedule.milestones=[0.5]"], None),
])
def test_lb_plan_and_lb_train_validate_alike(overrides, message, monkeypatch, tmp_path):
    overrides = ["scale=tiny", *overrides]
    planned = plan_outcome(overrides, monkeypatch)
    trained = train_outcome(overrides, monkeypatch, tmp_path / "run")
    assert planned == trained, (planned, trained)
    if message is None:
        assert planned is None
    else:
        assert planned is not None and message in planned and "\n" not in planned
        assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_lb_plan_prints_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.plan_main(["scale=tiny", "optimizer.name=foo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optimizer.name='foo' is unknown") and err.count("\n") == 1
