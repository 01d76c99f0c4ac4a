"""The MLM data path: tokenizer round trip, packing, masking statistics, batch order."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from largebatch.data import build_mlm_data
from largebatch.data.batching import index_steps
from largebatch.data.mlm import MaskedLMDataset, pack_sequences
from largebatch.data.tokenizer import load_or_train_tokenizer
from largebatch.labels import IGNORE_INDEX


def test_real_words_survive_a_tokenizer_round_trip(compose_cfg, tmp_path):
    from largebatch.data.sources import load_documents

    docs = load_documents(compose_cfg().data)
    tok = load_or_train_tokenizer(docs, 2048, tmp_path)
    text = "The king of England spoke to the people of the city"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    reloaded = load_or_train_tokenizer([], 2048, tmp_path)  # from the cache, not retrained
    assert reloaded(text)["input_ids"] == ids and len(reloaded) == len(tok) > 1000


def test_packing_makes_full_rows_with_cls_and_sep():
    rows = pack_sequences([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=5, cls_id=2, sep_id=3)
    # stream: 5 6 7 [SEP] 8 9 [SEP] 10 11 12 13 [SEP] -> bodies of 3, tail of 0 dropped
    assert rows.tolist() == [[2, 5, 6, 7, 3], [2, 3, 8, 9, 3], [2, 3, 10, 11, 3], [2, 12, 13, 3, 3]]


def test_masking_follows_bert_statistics_and_depends_only_on_index_and_epoch():
    seqs = torch.randint(10, 1000, (400, 128), dtype=torch.int32)
    seqs[:, 0], seqs[:, -1] = 2, 3
    ds = MaskedLMDataset(seqs, mask_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=1000, mlm_probability=0.15, seed=7)
    items = [ds[i] for i in range(len(ds))]
    labels = torch.stack([it["labels"] for it in items])
    inputs = torch.stack([it["input_ids"] for it in items])
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS]/[SEP] are never chosen
    masked = (inputs == 4) & chosen
    kept = (inputs == seqs.long()) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1 - 0.1 / 1000) < 0.02  # 10% kept (+ random hits of itself)
    assert torch.equal(ds[17]["labels"], items[17]["labels"])  # same index, same epoch: same mask
    ds.set_epoch(1)
    assert not torch.equal(ds[17]["labels"], items[17]["labels"])  # a new epoch re-masks


class IndexDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return {"index": torch.tensor(index)}


def test_batch_order_is_one_permutation_independent_of_batch_and_ranks():
    """The step loader's order: ranks in turn, each rank's micro-batches in turn, step after step."""
    def order(batch, micro, world):
        plan = SimpleNamespace(batch=batch, micro_batch=micro)
        loaders = [index_steps(IndexDataset(), plan, rank=r, world_size=world, seed=3) for r in range(world)]
        out = []
        for _ in range(1000 // batch):
            for loader in loaders:
                micro_batches = next(loader)
                assert len(micro_batches) == batch // (micro * world)
                assert all(len(mb["index"]) == micro for mb in micro_batches)
                out += [i for mb in micro_batches for i in mb["index"].tolist()]
        return out

    reference = order(8, 8, 1)
    for batch, micro, world in [(64, 16, 1), (64, 8, 2), (256, 32, 4)]:
        got = order(batch, micro, world)
        assert got == reference[: len(got)]  # same samples in the same order, grouped differently
    assert len(set(reference)) == len(reference) == 1000


def test_eval_split_and_masks_are_fixed_across_training_seeds(compose_cfg):
    cfg = compose_cfg()
    a = build_mlm_data(cfg.data, cfg.model.vocab_size, cfg.data.seq_len, seed=0)
    b = build_mlm_data(cfg.data, cfg.model.vocab_size, cfg.data.seq_len, seed=1)
    assert torch.equal(a.eval[0]["labels"], b.eval[0]["labels"])
    assert not torch.equal(a.train[0]["labels"], b.train[0]["labels"])
    assert len(a.train) > 10 * len(a.eval) > 0


def test_a_test_split_leaves_validation_as_it_was_and_comes_out_of_training():
    from largebatch.data import _split_documents

    documents = [f"document {i}" for i in range(200)]
    two = _split_documents(documents, 0.05)
    three = _split_documents(documents, 0.05, 0.05)
    assert three["eval"] == two["eval"] and len(three["test"]) == 10 and "test" not in two
    assert set(three["train"]) == set(two["train"]) - set(three["test"])
    assert not set(three["test"]) & set(three["eval"])
