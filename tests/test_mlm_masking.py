"""Per-batch masking (BERT's fixed count per sequence), the fixed-shape prediction head, the FLOPs/MFU
arithmetic and what ``auto`` resolves to (largebatch/data/mlm.py, models/bert.py, flops.py, device.py)."""

from __future__ import annotations

import pytest
import torch

from largebatch.data.mlm import MaskedLMDataset, mask_batch, masked_count, split_micro_batches
from largebatch.device import resolve_num_workers, resolve_precision
from largebatch.errors import ConfigError
from largebatch.flops import bert_flops_per_sample, mfu_metrics, peak_tflops
from largebatch.labels import IGNORE_INDEX
from largebatch.models.bert import build_bert

SPECIAL = [0, 1, 2, 3, 4]


def dataset(n=300, length=128, seed=7):
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(10, 1000, (n, length), generator=gen, dtype=torch.int32)
    seqs[:, 0], seqs[:, -1] = 2, 3
    seqs[::7, 40] = 3  # a document boundary inside some rows: [SEP] is never masked
    return seqs, MaskedLMDataset(seqs, mask_id=4, special_ids=SPECIAL, vocab_size=1000, seed=seed)


def test_bert_statistics_fixed_count_and_no_special_tokens():
    seqs, ds = dataset()
    batch = ds.__getitems__(list(range(len(ds))))
    chosen = batch["labels"] != IGNORE_INDEX
    assert masked_count(128, 0.15) == 19 == int(chosen.sum(1).min()) == int(chosen.sum(1).max())
    assert masked_count(512, 0.15) == 77 and masked_count(64, 0.15) == 10
    assert not torch.isin(seqs.long()[chosen], torch.tensor(SPECIAL)).any()
    assert torch.equal(batch["labels"][chosen], seqs.long()[chosen])
    masked = (batch["input_ids"] == 4) & chosen
    kept = (batch["input_ids"] == seqs.long()) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1 - 0.1 / 1000) < 0.02
    assert torch.equal(batch["input_ids"][~chosen], seqs.long()[~chosen])
    # uniform over the maskable positions: every position is chosen about equally often
    per_position = chosen[:, 1:-1].float().mean(0)
    assert per_position.min() > 0.08 and per_position.max() < 0.24
    pos = batch["masked_positions"]
    assert torch.equal(chosen, torch.zeros_like(chosen).scatter_(1, pos, True)) and bool((pos.diff(dim=1) > 0).all())


def test_masks_are_a_function_of_seed_epoch_and_index_whatever_the_batch():
    _, ds = dataset()
    whole = ds.__getitems__(list(range(0, 300, 3)))
    for split in ([list(range(0, 150, 3)), list(range(150, 300, 3))], [[i] for i in range(0, 300, 3)]):
        parts = [ds.__getitems__(p) for p in split]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    reordered = ds.__getitems__([9, 0, 3])
    assert torch.equal(reordered["labels"][0], whole["labels"][3]) and torch.equal(ds[3]["labels"], whole["labels"][1])
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["labels"], whole["labels"][1])  # a new epoch re-masks
    _, other_seed = dataset(seed=8)
    assert not torch.equal(other_seed[3]["labels"], whole["labels"][1])


def test_rows_with_too_few_maskable_tokens_pad_with_minus_one():
    ids = torch.tensor([[2, 11, 12, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]])
    out = mask_batch(ids, torch.tensor([5]), seed=0, epoch=0, mask_id=4, special_ids=torch.tensor(SPECIAL),
                     vocab_size=100, mlm_probability=0.15)
    assert sorted(out["masked_positions"][0].tolist()) == [-1, 1, 2]
    assert int((out["labels"] != IGNORE_INDEX).sum()) == 2


def test_micro_batches_split_the_step_in_order():
    _, ds = dataset()
    batch = ds.__getitems__(list(range(8)))
    parts = split_micro_batches(batch, 3)
    assert [len(p["input_ids"]) for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p["masked_positions"] for p in parts]), batch["masked_positions"])


def test_fixed_positions_head_gives_the_dynamic_loss():
    torch.manual_seed(0)
    model = build_bert("tiny", 1000, 0.0, 128).eval()
    assert model.mlm.config._attn_implementation == "sdpa"
    _, ds = dataset(n=6)
    batch = ds.__getitems__(list(range(6)))
    batch["masked_positions"][0, 0] = -1  # a padded slot (a row with fewer maskable tokens)
    batch["labels"][0, ds[0]["masked_positions"][0]] = IGNORE_INDEX
    with torch.no_grad():
        fixed = model(**batch)
        dynamic = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert int(fixed["count"]) == dynamic["count"] == 6 * 19 - 1
    assert float(fixed["loss_sum"]) == pytest.approx(float(dynamic["loss_sum"]), rel=1e-6)
    assert int(fixed["correct"]) == int(dynamic["correct"])


def test_flops_of_bert_base_on_known_shapes():
    model = build_bert("base", 30522, 0.0, 512)
    per_layer = 4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768  # attention, ffn, 2 norms
    encoder = 12 * per_layer
    head = 768 * 768 + 768 + 2 * 768 + 30522 * 768 + 30522  # transform, its norm, tied decoder + bias
    want = 6 * 128 * encoder + 12 * 12 * 128**2 * 768 + 6 * 19 * head
    assert bert_flops_per_sample(model, 128, 19) == want
    assert want == pytest.approx(6 * 128 * 85.05e6 + 1.81e9 + 6 * 19 * 24.0e6, rel=0.01)  # ~74 GFLOP
    compiled = torch.nn.Module()
    compiled._orig_mod = model  # what torch.compile wraps
    assert bert_flops_per_sample(compiled, 128, 19) == want


def test_mfu_arithmetic_and_the_peak_table():
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0 and peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H200", "fp16") == 989.4
    assert peak_tflops("NVIDIA H200", "no") is None and peak_tflops("Mystery GPU", "bf16") is None
    out = mfu_metrics(1e11, 8000.0, 2, "NVIDIA H200", "bf16")  # 1e11 * 4000 per device = 400 TFLOP/s
    assert out["tflops"] == pytest.approx(400.0) and out["mfu"] == pytest.approx(400.0 / 989.4)
    assert mfu_metrics(1e11, 8000.0, 2, "cpu", "no") == {"tflops": pytest.approx(400.0)}
    assert mfu_metrics(None, 8000.0, 1, "NVIDIA H200", "bf16") == {}


def test_auto_precision_and_workers():
    assert resolve_precision("auto", "cpu") == "no"
    assert resolve_precision("fp16", "cpu") == "fp16" and resolve_precision("no", "cuda") == "no"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda") == "no"
    assert resolve_num_workers("auto", "cpu") == (0, False)
    workers, pin = resolve_num_workers("auto", "cuda", local_world_size=1)
    assert 1 <= workers <= 4 and pin
    assert resolve_num_workers("auto", "cuda", local_world_size=1000) == (1, True)
    assert resolve_num_workers(3, "cpu") == (3, False)
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="num_workers"):
            resolve_num_workers(bad, "cuda")
