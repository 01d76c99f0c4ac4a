"""The stateful LSTM language model: the reference's loss convention, exact BPTT under accumulation and
ranks, perplexity, and the errors a user can make."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch

from conftest import REPO, lb, train_on_one_and_two_processes
from largebatch.cli import plan_rows
from largebatch.config import compose
from largebatch.data.ptb import batchify, load_word_corpus
from largebatch.tasks import build_task
from largebatch.train import train

LM = ["model=lstm_lm", "data=ptb", "model.dropout=0", "save_checkpoint=false"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A hand-made corpus in Mikolov's format: 30 words with a little structure to learn."""
    folder = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for split, lines in (("train", 300), ("valid", 40), ("test", 40)):
        rows = []
        for _ in range(lines):
            start = int(torch.randint(0, 30, (1,), generator=g))
            rows.append(" ".join(f"w{(start + 3 * i) % 30}" for i in range(int(torch.randint(4, 12, (1,), generator=g)))))
        (folder / f"ptb.{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def lm_cfg(corpus_dir, *overrides):
    return compose(["scale=tiny", "progress=false", *LM, f"data.folder={corpus_dir}", "data.max_tokens=null",
                    *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_losses(cfg, steps: int) -> list[float]:
    """The TensorFlow tutorial's loop, written out: streams = batchify(train, batch); each window's loss
    is the token losses summed over the window and averaged over the streams; clip; SGD."""
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    streams, window = batchify(task.corpus.train, cfg.batch), task.shape.bptt
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optimizer.lr)
    state, losses = None, []
    for t in range(steps):
        chunk = streams[:, t * window: (t + 1) * window + 1]
        out = model(chunk[:, :-1], chunk[:, 1:], state)
        state = tuple(s.detach() for s in out["state"])
        (out["loss_sum"] / cfg.batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip_norm)
        opt.step()
        opt.zero_grad()
        losses.append(out["loss_sum"].item() / out["count"])
    return losses


SGD = ["optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0", "optimizer.weight_decay=0",
       "optimizer.grad_clip_norm=5", "schedule=constant", "schedule.warmup_epochs=0", "log_every=1", "batch=8",
       "model.hidden=16", "model.bptt=5"]


def test_loss_convention_and_state_match_a_hand_written_reference_loop(corpus_dir, tmp_path):
    cfg = lm_cfg(corpus_dir, *SGD, "epochs=0.5")
    train(cfg, tmp_path / "run")
    got = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    want = reference_losses(cfg, len(got))
    assert len(got) > 20
    assert got == pytest.approx(want, rel=1e-5)
    assert got[-1] < got[0] - 0.1  # it learns: the comparison is not between two flat lines


def test_bptt_is_exact_under_accumulation(corpus_dir, tmp_path):
    """8 streams as 1 x 8, 4 x 2 and 2 x 4 micro-batches: the same loss at every step (each slot keeps its
    own streams' state across windows, and the loss is normalised by the global number of streams)."""
    runs = {}
    for micro in (8, 2, 4):
        train(lm_cfg(corpus_dir, *SGD, "epochs=1.5", f"micro_batch={micro}"), tmp_path / str(micro))
        runs[micro] = [m["loss"] for m in metrics(tmp_path / str(micro)) if "loss" in m]
    assert runs[2] == pytest.approx(runs[8], rel=1e-5) and runs[4] == pytest.approx(runs[8], rel=1e-5)
    assert max(m.get("epoch", 0) for m in metrics(tmp_path / "8")) > 1.4  # across an epoch boundary (state reset)


@pytest.mark.system
def test_two_processes_match_one(corpus_dir, tmp_path, data_cache):
    base = ["scale=tiny", *LM, f"data.folder={corpus_dir}", "data.max_tokens=null", *SGD, "micro_batch=2",
            "epochs=0.5", "progress=false"]
    one, two = (metrics(folder) for folder in train_on_one_and_two_processes(base, tmp_path))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    assert [m["loss"] for m in two if "loss" in m] == pytest.approx([m["loss"] for m in one if "loss" in m], rel=1e-5)
    assert two[-1]["eval/ppl"] == pytest.approx(one[-1]["eval/ppl"], rel=1e-5)


def tiny_lm(corpus_dir, scale: float = 1.0):
    """A 16-wide LM on the tiny corpus (every parameter times ``scale``), its task and its plan."""
    cfg = lm_cfg(corpus_dir, "model.hidden=16", "model.bptt=5")
    task = build_task(cfg)
    (_, (plan,), _), = plan_rows([*LM, "scale=tiny", f"data.folder={corpus_dir}", "data.max_tokens=null",
                                  "model.hidden=16", "model.bptt=5"], world_size=1)
    torch.manual_seed(0)
    model = task.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model, task, plan


def test_perplexity_is_exp_of_the_mean_token_loss_over_the_whole_split(corpus_dir):
    """Evaluation carries the state across windows: scoring in windows of 5 equals one pass over the split."""
    from accelerate import Accelerator

    model, task, plan = tiny_lm(corpus_dir)
    result = task.evaluate(model, Accelerator(cpu=True), plan)
    with torch.no_grad():
        for prefix, split in (("eval", task.corpus.valid), ("test", task.corpus.test)):
            out = model(split[None, :-1], split[None, 1:])
            assert result[f"{prefix}/tokens"] == split.numel() - 1
            assert result[f"{prefix}/loss"] == pytest.approx(out["loss_sum"].item() / out["count"], rel=1e-5)
            assert result[f"{prefix}/ppl"] == pytest.approx(math.exp(result[f"{prefix}/loss"]), rel=1e-12)


def test_a_blown_up_lm_records_no_perplexity_rather_than_failing(corpus_dir):
    """A loss past a float's exp (~709.78 nats, a model blown up by a too-large lr): the evaluation
    still returns, with the loss and no perplexity (JSON has no infinity), instead of an OverflowError."""
    from accelerate import Accelerator

    model, task, plan = tiny_lm(corpus_dir, scale=1e4)
    result = task.evaluate(model, Accelerator(cpu=True), plan)
    assert math.isfinite(result["eval/loss"]) and result["eval/loss"] > 710
    assert result["eval/ppl"] is None and result["eval/tokens"] == task.corpus.valid.numel() - 1


@pytest.mark.parametrize("loss, expected", [(0.0, 1.0), (math.log(178.8), 178.8), (709.0, math.exp(709.0)),
                                            (709.8, None), (1e4, None), (math.inf, None), (math.nan, None)])
def test_perplexity_is_exp_of_the_loss_within_a_floats_range_else_none(loss, expected):
    from largebatch.tasks.base import perplexity

    assert perplexity(loss) == (pytest.approx(expected) if expected is not None else None)

def test_ptb_plan_counts_windows_and_tokens(capsys):
    from largebatch.cli import plan_main

    plan_main(["--json", "experiment=ptb_zaremba_small"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the TensorFlow reader: ((929,589 // 20) - 1) // 20 = 2,323 windows of 20 tokens per stream
    assert (row["batch"], row["seq_len"], row["steps_per_epoch"]) == (20, 20, 2323)
    assert row["tokens_per_step"] == 400 and row["train_samples"] == 20 * 2323 and row["total_steps"] == 13 * 2323


@pytest.mark.parametrize(("overrides", "message"), [
    (["batch=5120"], "shorter than one BPTT window"),
    (["data=bundled"], "data=ptb"),
    (["data.folder=/nonexistent/ptb"], "/nonexistent/ptb"),
])
def test_bad_lm_inputs_give_one_clear_error(tmp_path, overrides, message):
    proc = subprocess.run([lb("lb-train"), "scale=tiny", "model=lstm_lm", "data=ptb", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 or proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ptb_corpus_is_the_mikolov_files():
    corpus = load_word_corpus()
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929_589, 73_760, 82_430)
    assert len(corpus.vocab) == 10_000
