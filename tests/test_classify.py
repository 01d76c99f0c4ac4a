"""MNIST-LSTM: an LSTM reading image rows learns in seconds; accumulation is exact; bad inputs are one line."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, lb
from largebatch.train import train

MNIST = ["model=lstm_classifier", "data=mnist", "save_checkpoint=false", "optimizer.lr=0.01"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_mnist_lstm_trains_above_chance_in_seconds(compose_cfg, tmp_path):
    summary = train(compose_cfg(*MNIST), tmp_path)
    assert summary["primary_metric"] == "eval/accuracy"
    assert summary["eval/samples"] == 4 * 64  # eval_max_batches x eval_batch of the 1,000 held-out digits
    assert summary["eval/accuracy"] > 0.4  # chance is 0.1


def test_classifier_accumulation_matches_the_full_batch(compose_cfg, tmp_path):
    common = [*MNIST, "epochs=0.3", "log_every=1", "optimizer=sgd", "optimizer.momentum=0", "optimizer.lr=0.5"]
    train(compose_cfg(*common, "micro_batch=32"), tmp_path / "full")
    train(compose_cfg(*common, "micro_batch=4"), tmp_path / "split")
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), rel=1e-5)


def test_plan_counts_images(capsys):
    from largebatch.cli import plan_main

    plan_main(["--json", "experiment=mnist_lstm"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["train_samples"], row["steps_per_epoch"], row["seq_len"]) == (4000, 31, None)  # 4000 // 128


def test_classifier_on_a_word_corpus_is_one_clear_error(tmp_path):
    proc = subprocess.run([lb("lb-train"), "scale=tiny", "model=lstm_classifier", "data=ptb",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "data=mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_a_validation_split_moves_eval_off_the_test_set(compose_cfg, tmp_path):
    summary = train(compose_cfg(*MNIST, "data.valid_size=500", "eval_max_batches=null"), tmp_path)
    assert summary["eval/samples"] == 500 and summary["test/samples"] == 1000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/accuracy" in m]
    assert evals and all("test/accuracy" in m for m in evals)  # test at every eval point: curves of both
    assert summary["eval/accuracy"] != summary["test/accuracy"]
