"""Per-device memory estimates (largebatch/memory.py) against hand-computed numbers, and lb-plan's
verdict on LAMB's paper run."""

from __future__ import annotations

import json

import pytest

from largebatch import memory
from largebatch.cli import plan_main

BERT_BASE = memory.TransformerShape(layers=12, hidden=768, heads=12, intermediate=3072, vocab=30522)


def test_bert_base_activations_follow_korthikanti_et_al():
    """16-bit, seq 128, micro-batch 32: per layer s*b*h*(34 + 5*a*s/h) = 3,145,728 x 44 = 138,412,032
    bytes (their eq. 1); embeddings 3*s*b*h = 9,437,184; MLM head at 15% of 4,096 positions:
    614.4 x (4*2*768 + 2*4*30522) = 153,796,608."""
    got = memory.transformer_activation_bytes(BERT_BASE, seq_len=128, micro_batch=32, bytes_per_value=2,
                                              masked_fraction=0.15)
    assert got == 12 * 138_412_032 + 9_437_184 + 153_796_608


def test_fp32_activations_count_every_kept_value_at_four_bytes():
    """fp32 keeps 66*s*b*h + 9*a*s^2*b per layer with a 4h feed-forward (34 and 5 at 16 bits); a head at
    every position keeps 4 values of h and 2 fp32 logits per vocabulary entry."""
    shape = memory.TransformerShape(layers=1, hidden=8, heads=2, intermediate=32, vocab=10)
    s, b, h, a = 4, 2, 8, 2
    layer = 66 * s * b * h + 9 * a * s * s * b  # 4,224 + 576
    embeddings = 5 * s * b * h
    head = s * b * (4 * 4 * h + 2 * 4 * 10)
    assert memory.transformer_activation_bytes(shape, s, b, bytes_per_value=4) == layer + embeddings + head == 6_784


@pytest.mark.parametrize(("name", "options", "count"), [
    ("lamb", {}, 2), ("adamw", {}, 2), ("lars", {}, 1), ("lars_paper", {}, 1), ("adagrad", {}, 1),
    ("sgd", {}, 1), ("sgd", {"momentum": 0.0}, 0), ("lars", {"momentum": 0.0}, 0),
])
def test_optimizer_state_is_counted_from_the_optimizer(name, options, count):
    assert memory.state_tensors_per_parameter(name, **options) == count


def test_sharding_divides_the_training_state_but_not_accumulated_gradients():
    plain = memory.estimate(parameters=1000, largest_unit=300, state_tensors=2, world_size=4, sharded=False,
                            accumulation=2, activations=500)
    assert (plain.parameters, plain.gradients, plain.optimizer_state, plain.gathered) == (4000, 4000, 8000, 0)
    assert plain.total == 16_500
    sharded = memory.estimate(parameters=1000, largest_unit=300, state_tensors=2, world_size=4, sharded=True,
                              accumulation=1, activations=None)
    # 1/4 of each; two units of 300 gathered (parameters + gradients, 4 bytes each)
    assert (sharded.parameters, sharded.gradients, sharded.optimizer_state, sharded.gathered) == (1000, 1000, 2000, 4800)
    assert sharded.total == 8800  # a lower bound: no activation estimate
    accumulating = memory.estimate(parameters=1000, largest_unit=300, state_tensors=2, world_size=4, sharded=True,
                                   accumulation=2, activations=None)
    assert accumulating.gradients == 4000  # no_sync keeps unsharded gradients between micro-batches


def test_lb_plan_says_whether_lamb_paper_run_fits(capsys):
    """BERT-large, batch 32768 on 64 devices of 16 GiB: the seq-512 stage (micro-batch 16) needs ~19 GiB
    per device under DDP and fits once FSDP2 shards the parameters and LAMB's two moments."""
    def plan(*extra):
        plan_main(["experiment=lamb_table1_paper", "batch=32768", "--world-size", "64", "--gpu-memory", "16",
                   "--json", *extra])
        return [json.loads(line)["memory"] for line in capsys.readouterr().out.splitlines()]

    ddp = plan()
    parameters = ddp[0]["parameters"] / 4
    assert 330e6 < parameters < 340e6  # BERT-large with a 30,522-token vocabulary
    assert ddp[0]["optimizer_state"] == 2 * ddp[0]["parameters"]  # LAMB's m and v, fp32
    assert [(m["name"], m["fits"]) for m in ddp] == [("seq128", "yes"), ("seq512", "no")]
    sharded = plan("sharding=fsdp2")
    assert sharded[1]["parameters"] == ddp[1]["parameters"] // 64
    assert [m["fits"] for m in sharded] == ["yes", "yes"]
