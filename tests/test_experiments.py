"""Every experiment file trains: a few steps of each at scale=tiny (lightning-hydra-template's
`experiment=glob(*)` test). The shrink overrides say what each file needs to fit in seconds."""

from __future__ import annotations

import math

import pytest

from conftest import REPO
from largebatch.train import train

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SHRINK = {  # beyond scale=tiny and a short run
    "lamb_table1": ["batch=32", "scaling.ref_batch=32"],
    "lamb_mixed_batch": ["stages.0.batch=64", "stages.1.batch=32", "scaling.ref_batch=32"],
    "lamb_table1_paper": ["data=bundled", "data.train_samples=null", "model.size=tiny", "model.vocab_size=2048",
                          "batch=32", "scaling.ref_batch=32", "precision=no", "stages.0.seq_len=32",
                          "stages.1.seq_len=64", "stages.0.micro_batch=16", "stages.1.micro_batch=16",
                          "schedule.warmup_epochs=0.001"],
    "resnet20_fashion": ["batch=32", "micro_batch=32", "schedule.warmup_epochs=0.03", "eval_batch=64"],
    # GNMT-4 (WMT16 from the hub) on 256 verse pairs, at a width of 16
    "gnmt4": ["data=verses", "data.train_samples=null", "model.hidden=16", "batch=16", "micro_batch=16",
              "scaling.ref_batch=16", "eval_batch=16", "model.beam_size=2"],
    # ResNet-50 (1000 classes, ImageNet stem) on the 1,000 tiny Fashion-MNIST images: one step or two.
    **{name: ["data=fashion_mnist", "data.train_samples=null", "model.depth=50", "batch=32", "micro_batch=16",
              "scaling.ref_batch=32", "precision=no", "schedule.warmup_epochs=0.03", "eval_batch=16"]
       for name in ("resnet50_goyal", "resnet50_mlperf_lars", "resnet50_lamb")},
}


def test_every_experiment_file_is_covered():
    """The glob finds the papers' files, and every shrink names a file that exists: a renamed experiment would
    otherwise train unshrunk (minutes, not seconds) while its old shrink sat unused."""
    assert {"lamb_table1", "ptb_zaremba_small", "mnist_lstm", "resnet50_mlperf_lars"} <= set(EXPERIMENTS)
    assert set(SHRINK) <= set(EXPERIMENTS), f"shrinks of no experiment file: {sorted(set(SHRINK) - set(EXPERIMENTS))}"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_a_few_steps(compose_cfg, tmp_path, name):
    cfg = compose_cfg(f"experiment={name}", "scale=tiny", "epochs=0.1", "eval_max_batches=2",
                      "save_checkpoint=false", *SHRINK.get(name, []))
    summary = train(cfg, tmp_path)
    assert summary["steps"] >= 1 and summary["skipped_steps"] == 0
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary[summary["primary_metric"]])
