"""The task seam: BERT's numbers did not move when the loop stopped knowing it trains a masked LM,
and the one batch split cuts every workload the same way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from largebatch.data import corpus_cache_dir
from largebatch.data.batching import StepSampler, rank_share, split_micro
from largebatch.train import train

REFERENCE = json.loads((Path(__file__).parent / "data" / "mlm_reference.json").read_text())
# experiment=lamb_table1's values when the reference was recorded (the experiment has moved on since)
RECORDED_WITH = {"two_stage": ["scaling.ref_batch=4", "schedule.warmup_epochs=0.0021875", "eval_every_epochs=0.1",
                               "data.seq_len=64"]}


@pytest.mark.parametrize("case", ["single", "two_stage"])
def test_mlm_numbers_unchanged_by_the_task_seam(compose_cfg, tmp_path, case):
    """The logged losses, norms, lrs and eval metrics of a tiny BERT run (one stage, and LAMB over
    two stages) equal those recorded by the trainer before the seam (see the file's _provenance)."""
    reference = REFERENCE[case]
    cfg = compose_cfg(*reference["overrides"], *RECORDED_WITH.get(case, []), f"data.cache_dir={tmp_path / 'cache'}")
    # The recorded tokenizer: training a WordPiece vocabulary is not deterministic across builds.
    shutil.copytree(Path(__file__).parent / "data" / "tiny_tokenizer", corpus_cache_dir(cfg.data, cfg.model.vocab_size))
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(reference["metrics"])
    for got, want in zip(lines, reference["metrics"]):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (got["step"], key)


def test_step_sampler_shares_one_permutation_between_ranks():
    one = list(StepSampler(40, 8, seed=3))
    ranks = [list(StepSampler(40, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(one) == 5 and all(len(step) == 8 for step in one)
    assert [a + b for a, b in zip(*ranks)] == one  # rank 0 takes the first half of every global batch
    assert sorted(i for step in one for i in step) == list(range(40))
    other_epoch = StepSampler(40, 8, seed=3)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != one


def test_rank_share_and_micro_split_cover_a_batch_once():
    batch, world, micro = 24, 3, 4
    seen = []
    for rank in range(world):
        share = range(batch)[rank_share(batch, world, rank)]
        parts = split_micro(len(share), micro)
        assert all(len(share[p]) == micro for p in parts)
        seen += [i for p in parts for i in share[p]]
    assert seen == list(range(batch))
    assert torch.equal(torch.arange(10)[rank_share(10, 2, 1)], torch.arange(5, 10))
