"""The trainer end to end on tiny configs: run records, exact accumulation, 2 processes, non-finite."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, lb
from largebatch.checkpoint import checkpoint_dirs
from largebatch.cli import plan_rows
from largebatch.errors import NonFiniteError
from largebatch.train import train


def epochs_for_steps(cfg_overrides: list[str], steps: int) -> float:
    (_, plans, _), = plan_rows(cfg_overrides, world_size=1)
    return steps / plans[0].steps_per_epoch


def test_three_step_lb_train_writes_every_record(tmp_path, data_cache):
    base = ["scale=tiny", f"data.cache_dir={data_cache}", "batch=32", "micro_batch=16"]
    epochs = epochs_for_steps(base, 3)
    run_dir = tmp_path / "run"
    proc = subprocess.run([lb("lb-train"), *base, f"epochs={epochs}", "progress=false", "log_every=1",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["config.yaml", "env.json", "plan.json", "metrics.jsonl", "summary.json"]:
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "checkpoints" / "step_00000003" / "model.safetensors").exists()
    assert (run_dir / "checkpoints" / "step_00000003" / "optimizer.bin").exists()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert (run_dir / "model" / "tokenizer.json").exists() and (run_dir / "model" / "config.json").exists()
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 1 and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert "sha" in env["git"] and "dirty" in env["git"] and env["hardware"]["cpu_count"] >= 1
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3]
    for key in ["lr", "grad_norm", "param_norm", "update_norm", "samples_per_s", "tokens_per_s", "tflops"]:
        assert all(m[key] >= 0 for m in train_lines), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["samples"] == 96
    assert 0 < summary["eval/loss"] < 20 and 0 <= summary["eval/accuracy"] <= 1
    assert "eval/loss" in proc.stderr + proc.stdout  # the final metrics are printed


def one_step_parameters(compose_cfg, tmp_path, name, *overrides):
    cfg = compose_cfg(*overrides)
    run_dir = tmp_path / name
    train(cfg, run_dir)
    return load_file(checkpoint_dirs(run_dir)[-1] / "model.safetensors")


def test_accumulated_step_equals_full_batch_step(compose_cfg, tmp_path):
    """One SGD step on batch 32 (real random 15% masks) split 1 x 32 and 4 x 8 gives the same parameters.

    SGD's update is linear in the gradient, so parameter differences are gradient differences
    (times lr): fp32 sums over ~150 masked tokens in another order differ by ~1e-7 relative."""
    base = ["batch=32", "optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0", "model.dropout=0",
            "schedule=constant", "schedule.warmup_epochs=0", "eval_max_batches=1", "log_every=1"]
    epochs = epochs_for_steps([*base, "scale=tiny"], 1)
    init = one_step_parameters(compose_cfg, tmp_path, "init", *base, "epochs=0.0001", "optimizer.lr=0")
    full = one_step_parameters(compose_cfg, tmp_path, "full", *base, f"epochs={epochs}", "micro_batch=32")
    split = one_step_parameters(compose_cfg, tmp_path, "split", *base, f"epochs={epochs}", "micro_batch=8")
    moved = 0.0
    for name, w in full.items():
        torch.testing.assert_close(split[name], w, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (w - init[name]).abs().max().item())
    assert moved > 1e-3  # the step did change the parameters, so the comparison means something


def test_nonfinite_loss_stops_with_a_message(compose_cfg, tmp_path):
    base = ["optimizer=sgd", "optimizer.lr=1e30", "optimizer.momentum=0", "schedule=constant",
            "schedule.warmup_epochs=0", "epochs=0.1"]
    with pytest.raises(NonFiniteError, match="non-finite"):
        train(compose_cfg(*base), tmp_path / "stop")


def poison_steps(monkeypatch, bad_steps: set[int], micro_per_step: int):
    """Make the loss of the given 1-based optimizer steps NaN (every micro-batch of the step)."""
    from largebatch.tasks.mlm import MaskedLMTask

    calls = {"n": 0}
    forward = MaskedLMTask.forward

    def poisoned(self, model, micro_batch, slot):
        out = forward(self, model, micro_batch, slot)
        calls["n"] += 1
        if (calls["n"] - 1) // micro_per_step + 1 in bad_steps:
            out["loss_sum"] = out["loss_sum"] * float("nan")
        return out

    monkeypatch.setattr(MaskedLMTask, "forward", poisoned)


def test_skipped_step_leaves_parameters_and_loss_average_untouched(compose_cfg, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2}, micro_per_step=2)
    summary = train(compose_cfg("batch=32", "micro_batch=16", "epochs=0.1", "log_every=1", "model.dropout=0",
                                "on_nonfinite=skip"), tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in lines if "grad_norm" in m}
    assert summary["skipped_steps"] == 1 and steps[2]["skipped_steps"] == 1
    assert "loss" not in steps[2] and steps[2]["grad_norm"] is None  # NaN is recorded as null, never as 0.0
    assert steps[2]["param_norm"] == steps[1]["param_norm"] != steps[3]["param_norm"]
    assert all(m["loss"] > 1 for s, m in steps.items() if s != 2)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text() + (tmp_path / "summary.json").read_text()


def test_too_many_skips_in_a_row_stop_the_run(compose_cfg, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2, 3, 4}, micro_per_step=2)
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        train(compose_cfg("batch=32", "micro_batch=16", "epochs=0.2", "on_nonfinite=skip", "max_consecutive_skips=2",
                          "save_checkpoint=false"), tmp_path)


@pytest.mark.system
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_cpu_run_matches_one_process(tmp_path, data_cache, launcher):
    base = ["scale=tiny", f"data.cache_dir={data_cache}", "batch=32", "micro_batch=8", "model.dropout=0",
            "progress=false", "save_checkpoint=false", "eval_max_batches=null"]
    base.append(f"epochs={epochs_for_steps(base, 4)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([lb("lb-train"), *base, f"hydra.run.dir={single}"], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)
    double = tmp_path / "double"
    if launcher == "torchrun":
        cmd = [lb("torchrun"), "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [lb("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "29517"]
    proc = subprocess.run([*cmd, "-m", "largebatch.cli", *base, f"hydra.run.dir={double}"],
                          env={**env, "ACCELERATE_USE_CPU": "true"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((double / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["samples"] == one["samples"]
    assert two["eval/loss"] == pytest.approx(one["eval/loss"], rel=1e-4)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)


def test_missing_local_data_path_is_one_clear_error(tmp_path):
    proc = subprocess.run([lb("lb-train"), "scale=tiny", "data=text_files", "data.files=[/nonexistent/corpus.txt]",
                           f"data.cache_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert "/nonexistent/corpus.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_logger_gets_config_and_metrics(compose_cfg, tmp_path, monkeypatch):
    """What the trainer sends to W&B (a stand-in for wandb.init records the calls)."""
    wandb = pytest.importorskip("wandb")
    calls = {"log": []}

    class FakeRun:
        def __init__(self, **kwargs):
            calls["init"] = kwargs
            self.config = type("C", (), {"update": lambda _, d, **k: calls.setdefault("config", d)})()
            self.summary = {}

        def log(self, metrics, step=None):
            calls["log"].append((step, metrics))

        def finish(self):
            calls["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun(**kw))
    train(compose_cfg("logger=wandb", "epochs=0.05", "save_checkpoint=false"), tmp_path)
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "largebatch"
    assert calls["init"]["config"]["optimizer"]["name"] == "adamw" and calls["init"]["config"]["batch"] == 32
    assert "plan" in calls["config"]
    steps = [s for s, m in calls["log"] if "loss" in m]
    assert steps == sorted(steps) and len(steps) >= 2
    assert any("eval/loss" in m for _, m in calls["log"]) and calls["finished"]


def test_stop_at_ends_the_run_at_the_first_evaluation_that_reaches_the_target(compose_cfg, tmp_path):
    """stop_at reads the task's primary metric (BERT: eval/loss, lower is better) or stop_metric; the summary
    says when the target was reached, or that it never was, and the metrics are the uninterrupted run's."""
    common = ["epochs=0.2", "eval_every_epochs=0.05", "log_every=1", "save_checkpoint=false"]
    full = train(compose_cfg(*common), tmp_path / "full")
    evals = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]
    second = evals[1]  # a target the second evaluation reaches and the first does not
    assert evals[0]["eval/loss"] > second["eval/loss"]
    early = train(compose_cfg(*common, f"stop_at={second['eval/loss']}"), tmp_path / "early")
    assert early["steps"] == second["step"] < full["steps"] and early["eval/loss"] == second["eval/loss"]
    assert early["stop_at"] == {"metric": "eval/loss", "target": second["eval/loss"], "reached": True,
                                "value": second["eval/loss"], "step": second["step"], "samples": second["samples"],
                                "wall_time_s": pytest.approx(early["stop_at"]["wall_time_s"])}
    never = train(compose_cfg(*common, "stop_at=0.5", "stop_metric=eval/accuracy"), tmp_path / "never")
    assert never["steps"] == full["steps"] and never["stop_at"]["reached"] is False
    assert never["stop_at"]["metric"] == "eval/accuracy"
