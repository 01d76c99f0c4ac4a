"""Shared fixtures: the REAL config tree, composed and shrunk to a tiny run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and OpenMP threads that wait for a core another process
# holds make a busy machine 10-30x slower; subprocesses (lb-train, torchrun) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One tokenizer/sequence cache for the whole session (the tiny corpus is tokenized once)."""
    return tmp_path_factory.mktemp("lbcache")


@pytest.fixture
def compose_cfg(data_cache):
    """compose_cfg(*overrides) -> the real `conf/train.yaml` at scale=tiny, with a test cache for the
    data configs that have one."""
    from largebatch.config import compose

    def _compose(*overrides: str):
        cfg = compose(["scale=tiny", "progress=false", *overrides])
        if "cache_dir" in cfg.data and not any(o.startswith("data.cache_dir=") for o in overrides):
            cfg.data.cache_dir = str(data_cache)
        return cfg

    return _compose


def load_script(relative_path: str):
    """A script of scripts/ imported as a module (registered in sys.modules: dataclasses look their module
    up there)."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def lb(cmd: str) -> str:
    """Path of an installed console script of this venv."""
    return str(BIN / cmd)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: threads only add OpenMP start-up cost, which explodes on a shared, busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_on_one_and_two_processes(overrides: list[str], folder: Path) -> tuple[Path, Path]:
    """`lb-train` with ``overrides`` in one process and under `torchrun` in two (gloo, one thread each):
    the two run folders."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = folder / "one", folder / "two"
    subprocess.run([lb("lb-train"), *overrides, f"hydra.run.dir={one}"], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)
    proc = subprocess.run([lb("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "largebatch.cli", *overrides,
                           f"hydra.run.dir={two}"], env={**env, "ACCELERATE_USE_CPU": "true"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two
