"""docs/extending.md's optimizer recipe, followed from outside the package: a registry entry added from
user code plus a YAML file in a config folder of its own (hydra.searchpath) is listed and trains."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import largebatch.train
from largebatch.optim import OPTIMIZERS, OptimizerSpec, describe_optimizers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY_YAML = """\
# Plain SGD without momentum: the docs/extending.md example.
defaults:
  - optimizer_schema
  - _self_
name: toy_sgd
lr: 0.5                      # peak lr at scaling.ref_batch
weight_decay: 0.0            # no weight decay
"""


@pytest.fixture
def toy_sgd(monkeypatch, tmp_path):
    """The recipe: a registry entry (undone after the test) and its YAML file; the config folder's URL."""
    spec = OptimizerSpec(name="toy_sgd", cls=torch.optim.SGD, base="sgd",
                         defaults=dict(OPTIMIZERS["sgd"].defaults, momentum=0.0),
                         description="SGD without momentum (docs/extending.md example)")
    monkeypatch.setitem(OPTIMIZERS, "toy_sgd", spec)
    conf = tmp_path / "my_conf"
    (conf / "optimizer").mkdir(parents=True)
    (conf / "optimizer" / "toy_sgd.yaml").write_text(TOY_YAML)
    return f"file://{conf}"


def test_registered_optimizer_is_listed_and_trains(toy_sgd, compose_cfg, tmp_path, monkeypatch):
    listing = describe_optimizers()
    assert any(line.split()[:3] == ["toy_sgd", "sgd", "+"] and "momentum=0.0" in line
               for line in listing.splitlines()), listing

    built = []
    real_create = largebatch.train.create_optimizer

    def spy(*args, **kwargs):
        built.append(real_create(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(largebatch.train, "create_optimizer", spy)
    cfg = compose_cfg(f"hydra.searchpath=[{toy_sgd}]", "optimizer=toy_sgd", "epochs=0.05", "log_every=1",
                      "save_checkpoint=false", "eval_max_batches=1", "noise_scale=false")
    assert cfg.optimizer.name == "toy_sgd" and cfg.optimizer.lr == 0.5
    run_dir = tmp_path / "run"
    summary = largebatch.train.train(cfg, run_dir)

    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert summary["optimizer"] == "toy_sgd"
    assert OmegaConf.load(run_dir / "config.yaml").optimizer.name == "toy_sgd"
    (opt,) = built
    assert type(opt) is torch.optim.SGD and all(g["momentum"] == 0.0 for g in opt.param_groups)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # plain SGD at lr 0.5 moves BERT-tiny off its initial loss
    assert math.isfinite(summary["eval/loss"])


def test_registration_is_undone():
    assert "toy_sgd" not in OPTIMIZERS
