"""Runs that survive: kill -9 or SIGTERM mid-run, resume, and every logged number equals the
uninterrupted run's (CPU, fp32, dropout on: the RNG states are restored); sweeps outlive a failing job;
run folders are never silently reused; bad values are one `error:` line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO, lb
from largebatch.checkpoint import Interrupted, checkpoint_dirs, write_manifest
from largebatch.errors import ConfigError
from largebatch.tracking import TIMING_KEYS
from largebatch.train import train

RUN = ["scale=tiny", "progress=false", "log_every=1", "epochs=4", "checkpoint_every_epochs=0.5"]


def records(run_dir) -> list[dict]:
    """Every metric line, without the timing fields (they differ between sessions by nature)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(resumed, reference):
    assert len(resumed) == len(reference)
    for got, want in zip(resumed, reference):
        assert got.keys() == want.keys(), got["step"]
        for key, value in want.items():
            exact = isinstance(value, str) or value is None  # e.g. a noise scale whose window is not yet positive
            assert got[key] == (value if exact else pytest.approx(value, rel=1e-6)), (got["step"], key)


def start(cmd, run_dir, data_cache, *extra, env=None):
    return subprocess.Popen([*cmd, *RUN, f"data.cache_dir={data_cache}", f"hydra.run.dir={run_dir}", *extra],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def kill_after_first_checkpoint(proc, run_dir, timeout=240):
    deadline = time.time() + timeout
    while not checkpoint_dirs(run_dir):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    # torchrun starts its workers in sessions of their own: kill whatever still runs in this folder
    subprocess.run(["pkill", "-9", "-f", f"hydra.run.dir={run_dir}"], check=False)
    proc.wait()
    time.sleep(0.5)
    assert not (run_dir / "summary.json").exists()  # it really died mid-run
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"


@pytest.mark.system
@pytest.mark.parametrize("world", [1, 2])
def test_kill_9_then_resume_continues_the_uninterrupted_run_exactly(tmp_path, data_cache, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [lb("lb-train")] if world == 1 else [lb("torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                                                 "largebatch.cli"]
    reference = start(cmd, tmp_path / "reference", data_cache, env=env)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    killed = start(cmd, tmp_path / "run", data_cache, env=env)
    kill_after_first_checkpoint(killed, tmp_path / "run")
    resumed = start(cmd, tmp_path / "run", data_cache, "resume=auto", env=env)
    assert resumed.wait(timeout=300) == 0, [line for line in resumed.stderr.read().splitlines() if "Error" in line][:8]
    assert_same_records(records(tmp_path / "run"), records(tmp_path / "reference"))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"
    assert len(checkpoint_dirs(tmp_path / "run")) == 2  # keep_checkpoints


def sigterm_at_step(monkeypatch, step: int, micro_per_step: int, task_class=None):
    from largebatch.tasks.mlm import MaskedLMTask

    task_class = task_class or MaskedLMTask
    calls = {"n": 0}
    forward = task_class.forward

    def forward_then_signal(self, model, micro_batch, slot):
        calls["n"] += 1
        if calls["n"] == step * micro_per_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, model, micro_batch, slot)

    monkeypatch.setattr(task_class, "forward", forward_then_signal)


STAGES = ["experiment=lamb_mixed_batch", "optimizer=adamw", "stages.0.batch=64", "stages.1.batch=32",
          "stages.0.fraction=0.5", "stages.1.fraction=0.5", "epochs=0.4", "eval_max_batches=2", "log_every=1",
          "micro_batch=16"]


def test_sigterm_at_a_stage_boundary_checkpoints_and_resume_matches(compose_cfg, tmp_path, monkeypatch):
    train(compose_cfg(*STAGES), tmp_path / "reference")
    plan = json.loads((tmp_path / "reference" / "plan.json").read_text())
    boundary = plan[0]["total_steps"]  # the last step of stage 1
    sigterm_at_step(monkeypatch, boundary, micro_per_step=plan[0]["accumulation"])
    with pytest.raises(Interrupted) as stopped:
        train(compose_cfg(*STAGES), tmp_path / "run")
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == boundary
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == [f"step_{boundary:08d}"]
    monkeypatch.undo()
    train(compose_cfg(*STAGES, "resume=auto"), tmp_path / "run")
    assert_same_records(records(tmp_path / "run"), records(tmp_path / "reference"))


def test_a_run_folder_is_never_silently_reused(compose_cfg, tmp_path):
    run = tmp_path / "run"
    train(compose_cfg("epochs=0.05", "save_checkpoint=false"), run)
    with pytest.raises(ConfigError, match="already holds a run .status: finished.*resume=auto.*overwrite=true"):
        train(compose_cfg("epochs=0.05"), run)
    with pytest.raises(ConfigError, match="another config .*optimizer.lr"):
        train(compose_cfg("epochs=0.05", "save_checkpoint=false", "optimizer.lr=0.5", "resume=auto"), run)
    train(compose_cfg("epochs=0.1", "save_checkpoint=false", "overwrite=true"), run)
    steps = [m["step"] for m in records(run) if "loss" in m]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines, none of the replaced run's


@pytest.mark.system
def test_a_sweep_outlives_a_diverging_job(tmp_path, data_cache):
    proc = subprocess.run([lb("lb-train"), "-m", "scale=tiny", "progress=false", "save_checkpoint=false",
                           f"data.cache_dir={data_cache}", "optimizer=sgd", "optimizer.momentum=0", "schedule=constant",
                           "epochs=0.1", "optimizer.lr=0.001,1e30,0.002", f"hydra.sweep.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "1 sweep job(s) failed" in proc.stderr and "non-finite loss" in proc.stderr
    statuses = {d.name.split("_")[0]: json.loads((d / "status.json").read_text()) for d in tmp_path.iterdir()
                if (d / "status.json").exists()}
    assert [statuses[i]["status"] for i in "012"] == ["finished", "failed", "finished"]
    assert "NonFiniteError: non-finite loss" in statuses["1"]["error"]


@pytest.mark.parametrize(("override", "message"), [
    # the values themselves are checked in-process, lb-plan's and lb-train's alike (tests/test_validation.py);
    # here the command line end to end: exit 2, one `error:` line, no traceback, nothing written
    ("eval_batch=0", "eval_batch=0 must be an integer > 0"),
    ("resume=/nonexistent/run", "/nonexistent/run"),
    ("hydra.run.dir=/dev/null/run", "cannot be created"),
])
def test_bad_values_are_one_error_line_and_write_nothing(tmp_path, override, message):
    proc = subprocess.run([lb("lb-train"), f"hydra.run.dir={tmp_path / 'run'}", "scale=tiny", override], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:") and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.yaml").exists()
    if (tmp_path / "run").is_dir():  # the folder Hydra made for it keeps the reason, for lb-report
        status = json.loads((tmp_path / "run" / "status.json").read_text())
        assert status["status"] == "failed" and message in status["error"]
        assert override in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()


def test_a_refused_command_leaves_the_run_it_refuses_untouched(tmp_path):
    """lb-train into a folder that holds a finished run (no resume, no overwrite) is refused, and the run's
    files are as they were: Hydra's own .hydra/ copy is off, the trainer writes it only once it accepts."""
    run = tmp_path / "run"
    first = [lb("lb-train"), "scale=tiny", "progress=false", "epochs=0.02", "save_checkpoint=false",
             f"hydra.run.dir={run}"]
    subprocess.run(first, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert "epochs=0.02" in (run / ".hydra" / "overrides.yaml").read_text()
    proc = subprocess.run([*first[:3], "epochs=0.05", *first[4:]], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    kept = {".lock", "cli.log"}  # Hydra's log of the commands run in the folder records the refused one too
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in kept}
    assert after == {k: v for k, v in before.items() if k.name not in kept}


def test_stateful_lm_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    """The LM's hidden states (per micro-batch slot) are part of the checkpoint: a resume in the middle of
    an epoch continues every stream where it was, dropout on."""
    from largebatch.config import compose
    from largebatch.tasks.lm import LanguageModelTask

    lm = ["scale=tiny", "progress=false", "model=lstm_lm", "data=ptb", "data.max_tokens=4000", "model.dropout=0.3",
          "batch=8", "micro_batch=2", "epochs=1.5", "log_every=1", "eval_every_epochs=1"]
    train(compose(lm), tmp_path / "reference")
    sigterm_at_step(monkeypatch, 30, micro_per_step=4, task_class=LanguageModelTask)  # 49 windows an epoch
    with pytest.raises(Interrupted):
        train(compose(lm), tmp_path / "run")
    monkeypatch.undo()
    train(compose([*lm, "resume=auto"]), tmp_path / "run")
    assert_same_records(records(tmp_path / "run"), records(tmp_path / "reference"))


def test_torn_metric_line_and_another_world_size(compose_cfg, tmp_path, monkeypatch):
    sigterm_at_step(monkeypatch, 3, micro_per_step=2)
    with pytest.raises(Interrupted):
        train(compose_cfg("epochs=0.2", "micro_batch=16", "log_every=1"), tmp_path)
    monkeypatch.undo()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # a kill in the middle of a line
    state = json.loads(next((tmp_path / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert state["world_size"] == 1
    train(compose_cfg("epochs=0.2", "micro_batch=16", "log_every=1", "resume=auto"), tmp_path)
    steps = [m["step"] for m in records(tmp_path) if "loss" in m]
    assert steps == list(range(1, len(steps) + 1))
    checkpoint = checkpoint_dirs(tmp_path)[-1]
    state_file = checkpoint / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"world_size": 1', '"world_size": 2'))
    for older in checkpoint_dirs(tmp_path)[:-1]:  # only the one "written by 2 processes" is left
        shutil.rmtree(older)
    write_manifest(checkpoint)  # as its 2 processes would have written it: whole, not damaged
    with pytest.raises(ConfigError, match="written by 2 process"):
        train(compose_cfg("epochs=0.2", "micro_batch=16", "log_every=1", "resume=auto"), tmp_path)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one_and_the_run_still_matches(
        compose_cfg, tmp_path, monkeypatch, caplog):
    """keep_checkpoints=2 keeps an older checkpoint for this: a truncated newest one (a disk fault after it was
    written) is named in a warning and the run resumes from the older one, every number as if uninterrupted.
    When every checkpoint is damaged, one error says so and how to start over."""
    from largebatch.checkpoint import MANIFEST

    run_cfg = [*STAGES, "checkpoint_every_epochs=0.1", "keep_checkpoints=2"]
    train(compose_cfg(*run_cfg), tmp_path / "reference")
    plan = json.loads((tmp_path / "reference" / "plan.json").read_text())
    forward_calls = plan[0]["total_steps"] * plan[0]["accumulation"] + 2 * plan[1]["accumulation"]  # stage 2, step 2
    sigterm_at_step(monkeypatch, 1, micro_per_step=forward_calls)
    with pytest.raises(Interrupted):
        train(compose_cfg(*run_cfg), tmp_path / "run")
    monkeypatch.undo()
    older, newest = checkpoint_dirs(tmp_path / "run")
    assert (newest / MANIFEST).is_file()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        train(compose_cfg(*run_cfg, "resume=auto"), tmp_path / "run")
    assert f"checkpoint {newest} is damaged (model.safetensors has 100 bytes" in caplog.text
    assert_same_records(records(tmp_path / "run"), records(tmp_path / "reference"))

    for checkpoint in checkpoint_dirs(tmp_path / "run"):
        (checkpoint / "trainer_state.json").write_text('{"step": 3')  # cut mid-write
    with pytest.raises(ConfigError, match="every checkpoint of .* is damaged .*overwrite=true"):
        train(compose_cfg(*run_cfg, "resume=auto"), tmp_path / "run")


def test_a_live_run_holds_its_folder_and_a_dead_one_frees_it(compose_cfg, tmp_path):
    """A second writer is refused while the first process lives, resume=auto included (the first would be
    interleaved with it); the kernel frees the lock when that process dies, so a crashed run resumes."""
    import sys

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write(f'pid {os.getpid()} on this host'); f.flush(); print('held', flush=True); time.sleep(120)"),
        str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["resume=auto"]):
            with pytest.raises(ConfigError, match=f"in use by a live run .pid {holder.pid} on this host.*SIGTERM"):
                train(compose_cfg("epochs=0.05", "save_checkpoint=false", *extra), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    train(compose_cfg("epochs=0.05", "save_checkpoint=false"), run)
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert f"pid {os.getpid()} " in (run / ".lock").read_text()


def test_skip_mode_undoes_an_update_that_blows_up_and_checkpoints_a_nan_metric(compose_cfg, tmp_path, monkeypatch):
    """on_nonfinite=skip: an update that leaves a parameter non-finite is undone (parameters and optimizer
    state as before it) and counted as skipped, so the run trains on; a non-finite eval metric is kept in the
    checkpoint (JSON has no NaN) and comes back on resume."""
    import math

    import torch

    from largebatch.checkpoint import read_trainer_state
    from largebatch.tasks.mlm import MaskedLMTask

    step, calls = torch.optim.AdamW.step, {"n": 0}

    def blow_up_the_third(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
        return out

    evaluate = MaskedLMTask.evaluate
    monkeypatch.setattr(torch.optim.AdamW, "step", blow_up_the_third)
    monkeypatch.setattr(MaskedLMTask, "evaluate", lambda *a: {**evaluate(*a), "eval/accuracy": math.nan})
    overrides = ["optimizer=adamw", "epochs=0.1", "log_every=1", "on_nonfinite=skip", "checkpoint_every_epochs=0.05"]
    summary = train(compose_cfg(*overrides), tmp_path / "run")
    assert summary["skipped_steps"] == 1 and math.isfinite(summary["final_loss"])
    lines = records(tmp_path / "run")
    assert all(math.isfinite(m["param_norm"]) for m in lines if "param_norm" in m)
    assert sum(1 for m in lines if "loss" in m) == summary["steps"] - 1  # the undone step's window has no loss
    state = read_trainer_state(checkpoint_dirs(tmp_path / "run")[-1])
    assert math.isnan(state.last_eval["eval/accuracy"]) and state.skipped == 1


def test_a_full_disk_during_a_checkpoint_is_one_error_with_the_failure_recorded(compose_cfg, tmp_path, monkeypatch):
    """ENOSPC while the second checkpoint is written: the partial folder is removed, status.json says failed
    (swapped in from a file written while there was space), one DiskFullError says how to resume, and once
    space is back resume=auto finishes the run."""
    import errno

    from largebatch import checkpoint as ckpt
    from largebatch import tracking
    from largebatch.errors import DiskFullError

    save, write, full = ckpt._save, tracking.atomic_write_json, {"calls": 0, "now": False}

    def save_until_full(accelerator, parallel, task, state, run_dir, keep, final, tmp):
        full["calls"] += 1
        if full["calls"] == 2:
            tmp.mkdir(parents=True)
            (tmp / "model.safetensors").write_bytes(b"half")
            full["now"] = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(accelerator, parallel, task, state, run_dir, keep, final, tmp)

    def write_unless_full(path, obj):
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, obj)

    monkeypatch.setattr(ckpt, "_save", save_until_full)
    monkeypatch.setattr(tracking, "atomic_write_json", write_unless_full)
    run = tmp_path / "run"
    overrides = ["epochs=0.2", "checkpoint_every_epochs=0.05"]
    with pytest.raises(DiskFullError, match="the disk is full: writing checkpoint step_.* failed .*resume=auto"):
        train(compose_cfg(*overrides), run)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "DiskFullError" in status["error"]
    assert not list((run / "checkpoints").glob(".step_*")) and len(checkpoint_dirs(run)) == 1
    monkeypatch.undo()
    train(compose_cfg(*overrides, "resume=auto"), run)
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
