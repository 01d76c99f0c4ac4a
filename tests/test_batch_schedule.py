"""Batch-size ramp-up (batch_schedule=linear | step): the phases' arithmetic, one lr schedule across them, the
split of every phase (exact under any micro-batch split), resume in the middle of the ramp, and bad schedules
as one error line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import assert_same_records, records, sigterm_at_step

from conftest import train_on_one_and_two_processes
from largebatch.checkpoint import Interrupted
from largebatch.cli import plan_main, plan_rows
from largebatch.plan import lr_schedule
from largebatch.sched import Phase, batch_phases
from largebatch.train import train

MNIST = ["model=lstm_classifier", "data=mnist", "optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.5"]
STEP = ["batch_schedule=step", "batch_schedule.milestones=[0.5,1]", "batch_schedule.factor=2"]  # 16, 32, 64
LINEAR = ["batch_schedule=linear", "batch_schedule.start_batch=32", "batch_schedule.increment=32",
          "batch_schedule.ramp_epochs=1.5"]  # 32, 64, 96 over 1.5 epochs, then 128


def plan_json(capsys, *overrides) -> list[dict]:
    plan_main(["--json", "scale=tiny", *overrides])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_phases_of_the_two_schedules():
    assert batch_phases("linear", batch=128, epochs=4, start_batch=32, increment=32, ramp_epochs=1.5) == [
        Phase(32, 0.0, 0.5), Phase(64, 0.5, 1.0), Phase(96, 1.0, 1.5), Phase(128, 1.5, 4.0)]
    assert batch_phases("step", batch=128, epochs=12, milestones=[6, 9], factor=5) == [
        Phase(128, 0.0, 6.0), Phase(640, 6.0, 9.0), Phase(3200, 9.0, 12.0)]


def test_plan_lists_steps_samples_and_lr_per_phase(capsys):
    """1,000 samples an epoch; each phase's steps are the run's steps between its ends, at its batch."""
    common = ["data.train_samples=1000", "micro_batch=16", "epochs=4", "optimizer.lr=0.1", "scaling=sqrt",
              "scaling.ref_batch=32", "schedule.warmup_epochs=0.25", "batch=128", *LINEAR]
    hold = plan_json(capsys, *common)
    assert [p["batch"] for p in hold] == [32, 64, 96, 128]
    assert [p["steps_per_epoch"] for p in hold] == [31, 15, 10, 7]
    # round(end x steps an epoch) - round(start x steps an epoch): 16 - 0, 15 - 8 (7.5 rounds up), 15 - 10, 28 - 11
    assert [p["total_steps"] for p in hold] == [16, 7, 5, 17]
    assert [p["samples"] for p in hold] == [512, 448, 480, 2176]
    assert [p["accumulation"] for p in hold] == [2, 4, 6, 8]
    assert [p["lr"] for p in hold] == pytest.approx([0.1 * 2] * 4)  # hold: sqrt(128 / 32) at every phase
    assert [p["warmup_steps"] for p in hold] == [8, 0, 0, 0]  # the run's warmup, all in the first phase
    scale = plan_json(capsys, *common, "batch_schedule.lr_rule=scale")
    assert [p["lr"] for p in scale] == pytest.approx([0.1 * (b / 32) ** 0.5 for b in (32, 64, 96, 128)])
    assert [p["total_steps"] for p in scale] == [16, 7, 5, 17]


def test_the_phases_share_one_lr_schedule():
    """Linear decay over the run: the lr of every phase's step is the run's at the epochs done after it (to a
    step's rounding), and the last step lands on end_lr."""
    (cfg, plans, _), = plan_rows(["scale=tiny", *MNIST, "epochs=4", "batch=128", "micro_batch=16", "schedule=linear",
                                  "schedule.warmup_epochs=0", *LINEAR], world_size=1)
    peak = plans[0].lr
    for p in plans:
        lr_at = lr_schedule(cfg.schedule, p)
        for s in range(p.total_steps):
            done = p.run_schedule.start_epoch + (s + 1) / p.steps_per_epoch  # epochs done after this step
            assert lr_at(s) == pytest.approx(peak * (1 - done / 4), abs=peak / p.steps_per_epoch)
    last = plans[-1]
    assert lr_schedule(cfg.schedule, last)(last.total_steps - 1) == pytest.approx(0.0, abs=1e-12)


def test_a_ramp_is_exact_under_two_micro_batch_splits(compose_cfg, tmp_path, one_torch_thread):
    common = [*MNIST, "epochs=1.5", "batch=16", *STEP, "log_every=1", "schedule=constant", "schedule.warmup_epochs=0"]
    for micro in (16, 4):
        train(compose_cfg(*common, f"micro_batch={micro}"), tmp_path / str(micro))
    whole, split = records(tmp_path / "16"), records(tmp_path / "4")
    steps = [m for m in whole if "loss" in m]
    # 0.5 epoch of the 1,000 images a phase: round(0.5 x 62); round(1 x 31) - round(0.5 x 31); 23 - 15
    assert [m["batch"] for m in steps] == [16] * 31 + [32] * 15 + [64] * 8
    assert {m["lr"] for m in steps} == {0.5}  # lr_rule=hold
    assert [m["loss"] for m in split if "loss" in m] == pytest.approx([m["loss"] for m in steps], rel=1e-5)
    a, b = (load_file(tmp_path / micro / "model" / "model.safetensors") for micro in ("16", "4"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_resume_in_the_middle_of_the_ramp_continues_the_uninterrupted_run(compose_cfg, tmp_path, monkeypatch,
                                                                          one_torch_thread):
    from largebatch.tasks.classify import ClassificationTask

    run = [*MNIST, "epochs=1.5", "batch=16", "micro_batch=8", *STEP, "log_every=1", "checkpoint_every_epochs=0.2",
           "eval_every_epochs=0.25", "model.dropout=0.2", "model.layers=2"]
    train(compose_cfg(*run), tmp_path / "reference")
    plans = json.loads((tmp_path / "reference" / "plan.json").read_text())
    # the 6th step of the second phase (batch 32), past a checkpoint in it: its forward passes so far
    forwards = plans[0]["total_steps"] * plans[0]["accumulation"] + 6 * plans[1]["accumulation"]
    sigterm_at_step(monkeypatch, forwards, micro_per_step=1, task_class=ClassificationTask)
    with pytest.raises(Interrupted):
        train(compose_cfg(*run), tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and plans[0]["total_steps"] < status["step"] < sum(
        p["total_steps"] for p in plans[:2])
    monkeypatch.undo()
    train(compose_cfg(*run, "resume=auto"), tmp_path / "run")
    assert_same_records(records(tmp_path / "run"), records(tmp_path / "reference"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["batch_schedule.factor=2"], "sets a key of a batch schedule, but none is chosen: add batch_schedule=linear"),
    (["batch_schedule=linear"], "batch_schedule=linear needs batch_schedule.start_batch, batch_schedule.increment"),
    ([*LINEAR[:-1], "batch_schedule.ramp_epochs=4"], "batch_schedule.ramp_epochs=4.0 must be > 0 and below epochs"),
    ([*LINEAR[:2], "batch_schedule.increment=40", LINEAR[-1]], "batch_schedule.increment=40 must be > 0 and divide"),
    (["batch_schedule=step"], "batch_schedule=step needs batch_schedule.milestones"),
    ([*STEP, "batch_schedule.milestones=[1,0.5]"], "must increase strictly and lie inside the run"),
    ([*STEP, "batch_schedule.start_batch=8"], "batch_schedule.start_batch is set, but batch_schedule=step does not"),
    ([*STEP, "batch_schedule.lr_rule=halve"], "batch_schedule.lr_rule='halve' is not one of hold | scale"),
    ([*STEP, "stages=[{batch: 16}]"], "batch_schedule and stages cannot both be set"),
    # 32, 64, 96, 128 at micro-batch 64: the phase of 96 does not split; 32 splits all of them
    (["micro_batch=64", *LINEAR], "phase batch96 (batch 96) does not divide into micro_batch=64 x world_size=1"),
])
def test_a_bad_schedule_is_one_error_line(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["scale=tiny", "data.train_samples=1000", "epochs=4", "batch=128", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if "micro_batch=64" in overrides:
        assert "micro_batch=32 splits every phase" in err


@pytest.mark.system
def test_a_ramp_on_two_processes_follows_the_one_process_run(tmp_path, data_cache):
    overrides = ["scale=tiny", "progress=false", *MNIST, "epochs=1.5", "batch=16", "micro_batch=4", *STEP,
                 "log_every=1", "eval_max_batches=2"]
    one, two = train_on_one_and_two_processes(overrides, tmp_path)
    a, b = ([m for m in records(d) if "loss" in m] for d in (one, two))
    assert [m["batch"] for m in a] == [m["batch"] for m in b] and {m["batch"] for m in a} == {16, 32, 64}
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-5)


def test_the_smith_study_reads_grow_against_decay(tmp_path):
    """scripts/batch_ramp_smith.py's reading on run folders written here: grow within a seed's noise of decay
    holds within the margin, the control is worse, and the step counts come from the runs."""
    from conftest import load_script

    study = load_script("scripts/batch_ramp_smith.py")
    table = study.jobs(tmp_path)
    accuracy = {"decay": 0.860, "grow": 0.861, "constant": 0.830}
    for (arm, seed), job in table.items():
        job.run_dir.mkdir(parents=True)
        acc = accuracy[arm] + 0.001 * seed
        lines = [{"step": 10, "loss": 2.0}] + [{"step": 10 * i, "samples": 100 * i, "eval/accuracy": acc,
                                                "test/accuracy": acc if i > 1 else 0.1, "test/loss": 1 - acc}
                                               for i in range(1, 5)]
        (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
        (job.run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
        steps = 1680 if arm == "grow" else 3000
        (job.run_dir / "summary.json").write_text(json.dumps({"steps": steps, "samples": 384000, "wall_time_s": 1.0}))
        plan = [{"batch": b, "epochs": e, "total_steps": n, "samples": n * b} for b, e, n in
                ((128, 6, 1500), (640, 3, 150), (3200, 3, 30))] if arm == "grow" else []
        (job.run_dir / "plan.json").write_text(json.dumps(plan))
    text = study.render(table, 60.0)
    head = text.split("## Caveats")[0]
    assert "**Yes, within this study's resolution**: in test loss growing the batch matched decaying the lr" in head
    assert "grow holds decay within the 1% margin" in head
    assert "**Optimizer steps**: grow 1680, decay 3000 (44% fewer); samples trained: grow 384,000" in head
    assert "Against the constant-lr control, decay gains +0.0300" in head
    assert "128 for 6 epochs (1500 steps), 640 for 3 epochs (150 steps), 3200 for 3 epochs (30 steps)" in text
