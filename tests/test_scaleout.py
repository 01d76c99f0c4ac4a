"""Scale-out on CPU processes (gloo): 2 processes under DDP and under FSDP2 (sharding=fsdp2) train a tiny
BERT as 1 process does at the same global batch, with LAMB and LARS; a sharded checkpoint resumes
exactly; a Hydra sweep through submitit's local executor runs each job as a 2-process run.

Tolerances (fp32, dropout off): the 2-process runs reduce the same sums in another order, so a step's
loss differs by round-off (~1e-7 relative; measured <= 5e-8 over 6 steps, eval loss <= 1e-7). Norms of the
262k-element embedding gradient carry more: torch's fp32 norm of that tensor is itself 1.4e-5 (relative) off
its float64 value, and a sharded norm (two halves, combined) errs differently (gradient norm under FSDP2
measured <= 8.5e-6 off the 1-process run, under DDP <= 1.2e-7), so norms and trust ratios are compared at
1e-4 and losses at 1e-5. A wrong gradient scale, a missed reduction or a per-shard trust ratio moves
them by orders of magnitude more (test_optimizers_step_sharded_parameters_as_whole_tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, lb
from largebatch.checkpoint import checkpoint_dirs
from largebatch.cli import plan_rows
from largebatch.noise import PREFIX as NOISE_KEYS
from largebatch.tracking import TIMING_KEYS
from largebatch.train import train

BASE = ["batch=32", "micro_batch=8", "model.dropout=0", "log_every=1", "eval_max_batches=1", "eval_batch=16"]
STEPS, CHECKPOINT_AT = 6, 3  # checkpoint_every_epochs ~ 3 steps (the first lands on step 3 or 4)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}


def records(run_dir) -> list[dict]:
    """Metric lines without wall-clock figures, and without the noise scale, whose small batch is a rank's
    own first micro-batch: it depends on the split by design."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS and not k.startswith(NOISE_KEYS)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_trajectory(got, want, loss_rel=1e-5, norm_rel=1e-4):
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), g["step"]
        for key, value in w.items():
            if isinstance(value, float):
                rel = loss_rel if "loss" in key or key == "eval/accuracy" else norm_rel
                assert g[key] == pytest.approx(value, rel=rel, abs=1e-12), (g["step"], key)
            else:
                assert g[key] == value, (g["step"], key)


@pytest.fixture(scope="module")
def run_overrides(data_cache):
    (_, plans, _), = plan_rows(["scale=tiny", f"data.cache_dir={data_cache}", *BASE], world_size=1)
    per_epoch = plans[0].steps_per_epoch
    return [*BASE, f"epochs={STEPS / per_epoch}", f"checkpoint_every_epochs={CHECKPOINT_AT / per_epoch}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache, run_overrides):
    """runs(world, sharding, optimizer[, launcher]) -> the run folder, each run done once for the module."""
    done, root = {}, tmp_path_factory.mktemp("scaleout")

    def run(world: int, sharding: str, optimizer: str, launcher: str = "torchrun"):
        key = (world, sharding, optimizer, launcher)
        if key not in done:
            run_dir = root / "_".join(map(str, key))
            overrides = [*run_overrides, f"optimizer={optimizer}", f"sharding={sharding}"]
            if world == 1:
                from largebatch.config import compose

                train(compose(["scale=tiny", "progress=false", f"data.cache_dir={data_cache}", *overrides]), run_dir)
            else:
                launch(launcher, run_dir, data_cache, *overrides)
            done[key] = run_dir
        return done[key]

    return run


LAUNCHERS = {
    "torchrun": [lb("torchrun"), "--standalone", "--nproc_per_node", "2"],
    # the multi-GPU recipe, on 2 CPU processes
    "accelerate": [lb("accelerate"), "launch", "--config_file", str(REPO / "conf" / "accelerate" / "multi_gpu.yaml"),
                   "--num_processes", "2", "--main_process_port", "29519"],
}


def launch(launcher, run_dir, data_cache, *overrides):
    proc = subprocess.run([*LAUNCHERS[launcher], "-m", "largebatch.cli", "scale=tiny", "progress=false",
                           f"data.cache_dir={data_cache}", *overrides, f"hydra.run.dir={run_dir}"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.system
@pytest.mark.parametrize(("sharding", "optimizer", "launcher"), [
    ("none", "lamb", "torchrun"), ("none", "lars", "torchrun"), ("fsdp2", "lamb", "torchrun"),
    ("fsdp2", "lars", "accelerate")])
def test_two_processes_train_as_one(runs, sharding, optimizer, launcher):
    one, two = runs(1, "none", optimizer), runs(2, sharding, optimizer, launcher)
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    want = records(one)
    assert sum("trust_ratio/mean" in m for m in want) == STEPS  # LAMB/LARS diagnostics are compared too
    assert_same_trajectory(records(two), want)
    if sharding == "fsdp2":  # model and optimizer state are stored as one shard per rank
        shards = checkpoint_dirs(two)[-1] / "fsdp2"
        assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        exported, reference = load_file(two / "model" / "model.safetensors"), load_file(one / "model" / "model.safetensors")
        assert exported.keys() == reference.keys()
        for name, tensor in reference.items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.system
def test_fsdp2_checkpoint_resumes_exactly(runs, data_cache, run_overrides, tmp_path):
    """The run killed after its first checkpoint (here: the finished run, with every later checkpoint and
    record removed) resumes from the shards and writes the uninterrupted run's numbers."""
    reference = runs(2, "fsdp2", "lamb")
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    first, *later = checkpoint_dirs(run_dir)
    assert int(first.name.split("_")[1]) < STEPS and later
    for checkpoint in later:
        shutil.rmtree(checkpoint)
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    launch("torchrun", run_dir, data_cache, *run_overrides, "optimizer=lamb", "sharding=fsdp2", "resume=auto")
    assert_same_trajectory(records(run_dir), records(reference), loss_rel=1e-6, norm_rel=1e-6)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow  # ~35 s: 2 jobs x 2 processes at once
def test_submitit_local_sweep_runs_each_job_on_two_processes(tmp_path, data_cache, run_overrides):
    """`lb-train -m ... hydra/launcher=local_multiproc`: submitit's local executor starts one task per rank;
    the trainer takes rank and world from the job's environment (slurm_multigpu.yaml differs only in keys)."""
    proc = subprocess.run([lb("lb-train"), "-m", "hydra/launcher=local_multiproc", "scale=tiny", "progress=false",
                           f"data.cache_dir={data_cache}", *BASE, "epochs=0.05", "save_checkpoint=false",
                           "optimizer=lamb,lars", f"hydra.sweep.dir={tmp_path}"],
                          env={**ENV, "ACCELERATE_USE_CPU": "false"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if (p / "summary.json").exists())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job, optimizer in zip(jobs, ["lamb", "lars"]):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["optimizer"] == optimizer and summary["steps"] > 0
        assert json.loads((job / "status.json").read_text())["status"] == "finished"


@pytest.mark.system
def test_optimizers_step_sharded_parameters_as_whole_tensors(tmp_path):
    """Every registry optimizer with implementation=auto on FSDP2-sharded parameters (uneven shards
    included), 2 processes with 2 micro-batches each, matches the unsharded optimizer on the whole batch:
    trust ratios are whole-tensor ratios, the global pre-clip sees the global norm (tests/sharded_optimizers.py)."""
    out = tmp_path / "results.json"
    proc = subprocess.run([lb("torchrun"), "--standalone", "--nproc_per_node", "2", str(REPO / "tests" / "sharded_optimizers.py"),
                           str(out)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    from largebatch.optim import OPTIMIZERS

    for name in [*OPTIMIZERS, "adamw{'grad_clip_norm': 0.05}", "lars{'grad_clip_norm': 0.05}"]:
        found = results[name]
        assert found["moved"] > 1e-3, name  # the steps did move the parameters
        # fp32 round-off: <= 1.5e-6 measured (fused AdamW against the foreach reference), else <= 2e-7
        assert found["diff"] < 1e-5, (name, found)
        assert found["ratio_keys_equal"] and found["ratio_rel_diff"] < 1e-5, (name, found)
        if OPTIMIZERS[name.split("{")[0]].adapts:
            assert found["path"] == "foreach", name
    assert "cannot step sharded" in results["cpp_error"] and "implementation='auto'" in results["cpp_error"]
    assert results["evaluation_forwards"] == 2 and results["resharded"]


@pytest.mark.parametrize(("env", "overrides", "message"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed is not supported.*sharding=fsdp2"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "Accelerate's FSDP plugin.*add sharding=fsdp2"),
    ({}, ["sharding=fsdp2"], "sharding=fsdp2 shards over processes and this run has one"),
    ({"WORLD_SIZE": "2"}, ["sharding=fsdp2", "precision=fp16"], "use precision=bf16"),
])
def test_unsupported_launches_are_refused_before_anything_is_written(compose_cfg, tmp_path, monkeypatch, env,
                                                                     overrides, message):
    from largebatch.errors import ConfigError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(*overrides), tmp_path)
    assert not any(tmp_path.iterdir())


def test_launch_recipes_load_and_sweep_configs_differ_only_in_their_keys():
    from accelerate.commands.config import load_config_from_file
    from hydra import compose, initialize_config_dir

    from largebatch.config import CONF_DIR, register_configs

    kinds = {name: load_config_from_file(str(REPO / "conf" / "accelerate" / f"{name}.yaml")).distributed_type
             for name in ("one_gpu", "multi_gpu", "multi_node", "tpu")}
    assert kinds == {"one_gpu": "NO", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU", "tpu": "XLA"}
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm, local = (compose("train", [f"hydra/launcher={name}"], return_hydra_config=True).hydra.launcher
                        for name in ("slurm_multigpu", "local_multiproc"))
    assert slurm._target_.endswith("SlurmLauncher") and local._target_.endswith("LocalLauncher")
    assert slurm.tasks_per_node == slurm.gpus_per_node == 8 and local.tasks_per_node == 2  # one task per rank
