"""Data factory: documents -> WordPiece tokenizer -> packed sequences -> masked-LM datasets.

Everything derived from the documents is cached under ``data.cache_dir`` in a folder keyed by the
corpus and split settings, so the tokenizer is trained once and every sequence length is tokenized
once. The held-out split is by DOCUMENT, with a fixed seed, so it is the same for every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from largebatch.data.mlm import MaskedLMDataset, pack_sequences
from largebatch.data.tokenizer import load_or_train_tokenizer

log = logging.getLogger(__name__)

SPLIT_SEED = 1234  # the held-out documents do not depend on the training seed
CACHE_VERSION = 1

__all__ = ["MLMData", "build_mlm_data", "corpus_cache_dir"]


@dataclass
class MLMData:
    train: MaskedLMDataset
    eval: MaskedLMDataset
    tokenizer: object
    seq_len: int

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def corpus_cache_dir(data_cfg, vocab_size: int) -> Path:
    spec = {
        "name": data_cfg.name, "sources": list(data_cfg.sources), "files": list(data_cfg.files),
        "hub": list(data_cfg.hub_datasets), "text_column": data_cfg.text_column,
        "max_documents": data_cfg.max_documents, "eval_fraction": data_cfg.eval_fraction,
        "vocab_size": vocab_size, "version": CACHE_VERSION,
    }
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_cfg.cache_dir) / f"{data_cfg.name}-v{vocab_size}-{digest}"


def _split_documents(documents: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_eval = max(1, round(eval_fraction * len(documents)))
    held_out = set(order[:n_eval])
    train = [d for i, d in enumerate(documents) if i not in held_out]
    evaluation = [d for i, d in enumerate(documents) if i in held_out]
    return train, evaluation


def _build_sequences(data_cfg, vocab_size: int, seq_len: int, cache: Path):
    from largebatch.data.sources import load_documents

    documents = load_documents(data_cfg)
    train_docs, eval_docs = _split_documents(documents, data_cfg.eval_fraction)
    tokenizer = load_or_train_tokenizer(train_docs, vocab_size, cache)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    splits = {}
    for name, docs in (("train", train_docs), ("eval", eval_docs)):
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        splits[name] = pack_sequences(ids, seq_len, cls_id, sep_id)
    torch.save(splits, cache / f"seq{seq_len}.pt")
    log.info("tokenized %d train / %d eval documents into %d / %d sequences of %d tokens (cache: %s)",
             len(train_docs), len(eval_docs), len(splits["train"]), len(splits["eval"]), seq_len, cache)
    return tokenizer, splits


def build_mlm_data(data_cfg, vocab_size: int, seq_len: int, seed: int) -> MLMData:
    """Build (or load from the cache) the train and held-out masked-LM datasets."""
    from transformers import BertTokenizerFast

    cache = corpus_cache_dir(data_cfg, vocab_size)
    seq_file = cache / f"seq{seq_len}.pt"
    if seq_file.exists() and (cache / "tokenizer.json").exists():
        tokenizer = BertTokenizerFast.from_pretrained(cache)
        splits = torch.load(seq_file)
    else:
        tokenizer, splits = _build_sequences(data_cfg, vocab_size, seq_len, cache)
    common = dict(
        mask_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids,
        vocab_size=len(tokenizer),
        mlm_probability=data_cfg.mlm_probability,
    )
    train = splits["train"]
    if data_cfg.train_multiple_of:  # every batch of a ladder then divides the epoch: no rung drops a tail
        train = train[: len(train) - len(train) % data_cfg.train_multiple_of]
    return MLMData(
        train=MaskedLMDataset(train, seed=seed, **common),
        # Fixed masks for evaluation: every run and every eval point scores the same tokens.
        eval=MaskedLMDataset(splits["eval"], seed=SPLIT_SEED, **common),
        tokenizer=tokenizer,
        seq_len=seq_len,
    )
