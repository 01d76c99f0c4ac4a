"""The data package: one loader per kind of data (``images``, ``ptb``, ``parallel``, ``classification``,
``squad``, the corpora of ``sources``), the batch split every task uses (``batching``), and, in this module,
the masked-LM pipeline: documents -> WordPiece tokenizer -> packed sequences -> masked-LM datasets.

Everything derived from the documents is cached under ``data.cache_dir`` in a folder keyed by the
corpus and split settings AND by the size, mtime and content hash of every input file
(``sources.input_files``, ``fileio.file_fingerprint``), so
the tokenizer is trained once, every sequence length is tokenized once, and a file edited in place
gives a new cache. A cache folder appears complete or not at all: the first build (tokenizer and the
first ``seq{L}.pt``) is made in a temporary folder and renamed into place, each later ``seq{L}.pt`` is
written under a temporary name and renamed; a folder without its tokenizer, or whose tokenizer does not
load (a truncated ``tokenizer.json``: a warning names it), is rebuilt, and a
``seq{L}.pt`` made by another tokenizer, or unreadable, is made again. The held-out split is by
DOCUMENT, with a fixed seed, so it is the same for every run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from largebatch.data import tokenizer as wordpiece
from largebatch.data.mlm import MaskedLMDataset, pack_sequences
from largebatch.errors import ConfigError
from largebatch.fileio import atomic_dir, atomic_file, atomic_write_json, file_fingerprint

log = logging.getLogger(__name__)

SPLIT_SEED = 1234  # the held-out documents do not depend on the training seed
CACHE_VERSION = 3  # 2: keyed on the input files' size and mtime, built atomically, seq files name their tokenizer;
# 3: and on their content hash (older folders are not found again: rebuilt once)
MANIFEST = "cache.json"  # what a cache folder was built from (for people; completeness is the tokenizer's files)

__all__ = ["MLMData", "build_mlm_data", "corpus_cache_dir"]


@dataclass
class MLMData:
    train: MaskedLMDataset
    eval: MaskedLMDataset  # validation: what evaluation points and selection read
    tokenizer: object
    seq_len: int
    test: MaskedLMDataset | None = None  # held out apart from validation (data.test_fraction > 0)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def input_fingerprint(data_cfg) -> list[list]:
    """[path, size, mtime_ns, content hash] of every local file the documents are read from."""
    from largebatch.data.sources import input_files

    out = []
    for path in input_files(data_cfg):
        out.append([os.path.realpath(path), *file_fingerprint(path)])
    return out


def _cache_spec(data_cfg, vocab_size: int) -> dict:
    return {
        "name": data_cfg.name, "sources": list(data_cfg.sources), "files": list(data_cfg.files),
        "hub": list(data_cfg.hub_datasets), "text_column": data_cfg.text_column,
        "max_documents": data_cfg.max_documents, "eval_fraction": data_cfg.eval_fraction,
        "vocab_size": vocab_size, "version": CACHE_VERSION, "inputs": input_fingerprint(data_cfg),
        # only when set, so the caches built before test splits existed keep their keys
        **({"test_fraction": getattr(data_cfg, "test_fraction", 0.0)} if getattr(data_cfg, "test_fraction", 0.0) else {}),
    }


def corpus_cache_dir(data_cfg, vocab_size: int) -> Path:
    return _cache_dir(data_cfg, _cache_spec(data_cfg, vocab_size))


def _cache_dir(data_cfg, spec: dict) -> Path:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(data_cfg.cache_dir) / f"{data_cfg.name}-v{spec['vocab_size']}-{digest}"


def _split_documents(documents: list[str], eval_fraction: float, test_fraction: float = 0.0) -> dict[str, list[str]]:
    """{"train", "eval"[, "test"]}: by document, with a fixed seed. The validation documents are the same
    with or without a test split; the test documents come out of training."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    n_eval = max(1, round(eval_fraction * len(documents)))
    n_test = max(1, round(test_fraction * len(documents))) if test_fraction else 0
    role = {i: "eval" for i in order[:n_eval]} | {i: "test" for i in order[n_eval:n_eval + n_test]}
    splits = {"train": [], "eval": [], **({"test": []} if n_test else {})}
    for i, d in enumerate(documents):
        splits[role.get(i, "train")].append(d)
    return splits


def _describe(data_cfg) -> str:
    inputs = data_cfg.sources or data_cfg.files or data_cfg.hub_datasets
    return f"data={data_cfg.name} {list(inputs)}"


def _split_corpus(data_cfg) -> dict[str, list[str]]:
    from largebatch.data.sources import load_documents

    documents = load_documents(data_cfg)
    docs = _split_documents(documents, data_cfg.eval_fraction, getattr(data_cfg, "test_fraction", 0.0))
    if not docs["train"]:
        raise ConfigError(
            f"{_describe(data_cfg)} yields {len(documents)} document(s), all held out for evaluation "
            f"(data.eval_fraction={data_cfg.eval_fraction}, data.test_fraction={getattr(data_cfg, 'test_fraction', 0.0)}): add documents (in .txt files, blank-line-separated "
            "blocks) or lower data.eval_fraction"
            + (f" / raise data.max_documents={data_cfg.max_documents}" if data_cfg.max_documents else "")
        )
    return docs


def _tokenize(tokenizer, docs: dict[str, list[str]], seq_len: int, data_cfg) -> dict:
    splits = {}
    for name, texts in docs.items():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        splits[name] = pack_sequences(ids, seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
    empty = [name for name in splits if len(splits[name]) == 0]
    if empty:  # a run on them would "finish" with loss 0.0 and 0 eval tokens
        raise ConfigError(
            f"{_describe(data_cfg)} holds too little text for sequences of {seq_len} tokens: "
            + " / ".join(f"{len(splits[n])} {n}" for n in splits) + " sequences from "
            + " / ".join(str(len(docs[n])) for n in splits) + " documents; add text, lower data.seq_len, or raise "
            "data.eval_fraction (data.test_fraction) if a held-out split is the empty one"
        )
    return splits


def _save_sequences(splits: dict, path: Path, tokenizer_id: str) -> None:
    """torch.save under a temporary name in the same folder, renamed into place when complete."""
    with atomic_file(path, "wb") as f:
        torch.save({**splits, "tokenizer": tokenizer_id}, f)


def _load_sequences(path: Path, tokenizer_id: str) -> dict | None:
    """The cached splits, or None when the file is absent, unreadable or made with another tokenizer."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path)
    except Exception as error:  # any unreadable cache file is made again
        log.warning("unreadable data cache file %s (%s): tokenizing again", path, error)
        return None
    if not isinstance(saved, dict) or not {"train", "eval"} <= saved.keys():
        log.warning("data cache file %s is not a train/eval split: tokenizing again", path)
        return None
    if saved.get("tokenizer") != tokenizer_id:
        log.warning("data cache file %s was made with another tokenizer: tokenizing again", path)
        return None
    return {k: v for k, v in saved.items() if k in ("train", "eval", "test")}


class _BuiltMeanwhile(Exception):
    """Another process completed the same cache folder while this one was building it."""


def _build_cache(data_cfg, spec: dict, seq_len: int, cache: Path, damaged: str | None = None):
    """The first build: documents, tokenizer and ``seq{seq_len}.pt`` in a temporary folder, renamed to
    ``cache`` only when all of it is written (a failure leaves no folder behind). ``damaged``: the
    :func:`~largebatch.data.tokenizer.tokenizer_id` of a cached tokenizer that does not load, which this
    build replaces (any other complete tokenizer found there was built meanwhile, and is used)."""
    docs = _split_corpus(data_cfg)
    try:
        with atomic_dir(cache) as tmp:
            wordpiece.save_tokenizer(wordpiece.train_wordpiece(docs["train"], spec["vocab_size"]), tmp)
            tokenizer = wordpiece.load_tokenizer(tmp)
            splits = _tokenize(tokenizer, docs, seq_len, data_cfg)
            _save_sequences(splits, tmp / f"seq{seq_len}.pt", wordpiece.tokenizer_id(tmp))
            atomic_write_json(tmp / MANIFEST, {**spec, "documents": {k: len(v) for k, v in docs.items()}})
            if wordpiece.has_tokenizer(cache) and (damaged is None or wordpiece.tokenizer_id(cache) != damaged):
                # first complete build wins: every run then uses one tokenizer
                raise _BuiltMeanwhile
    except _BuiltMeanwhile:
        log.info("another process built the data cache %s meanwhile: using it", cache)
        return _load_or_build(data_cfg, spec, seq_len, cache)
    _log_tokenized(docs, splits, seq_len, cache)
    return wordpiece.load_tokenizer(cache), splits


def _log_tokenized(docs: dict, splits: dict, seq_len: int, cache: Path) -> None:
    log.info("tokenized %s documents into %s sequences of %d tokens (cache: %s)",
             " / ".join(f"{len(v)} {k}" for k, v in docs.items()), " / ".join(str(len(v)) for v in splits.values()),
             seq_len, cache)


def _load_or_build(data_cfg, spec: dict, seq_len: int, cache: Path):
    if not wordpiece.has_tokenizer(cache):
        if cache.exists():
            log.warning("the data cache %s has no complete tokenizer: building it again", cache)
        else:
            log.warning("building the data cache %s: a tokenizer trained on the corpus, then every sequence "
                        "(once per corpus and vocabulary; minutes for the bundled corpus on 2 cores)", cache)
        return _build_cache(data_cfg, spec, seq_len, cache)
    tokenizer = wordpiece.load_cached_tokenizer(cache)  # None: damaged, and named in a warning
    if tokenizer is None:
        return _build_cache(data_cfg, spec, seq_len, cache, damaged=wordpiece.tokenizer_id(cache))
    token_id = wordpiece.tokenizer_id(cache)
    seq_file = cache / f"seq{seq_len}.pt"
    splits = _load_sequences(seq_file, token_id)
    if splits is None:  # a new sequence length for an existing tokenizer: one more file, renamed into place
        log.warning("tokenizing the corpus into sequences of %d tokens (once per length): %s", seq_len, seq_file)
        docs = _split_corpus(data_cfg)
        splits = _tokenize(tokenizer, docs, seq_len, data_cfg)
        _save_sequences(splits, seq_file, token_id)
        _log_tokenized(docs, splits, seq_len, cache)
    return tokenizer, splits


def build_mlm_data(data_cfg, vocab_size: int, seq_len: int, seed: int) -> MLMData:
    """Build (or load from the cache) the train and held-out masked-LM datasets."""
    spec = _cache_spec(data_cfg, vocab_size)
    tokenizer, splits = _load_or_build(data_cfg, spec, seq_len, _cache_dir(data_cfg, spec))
    common = dict(
        mask_id=tokenizer.mask_token_id,
        special_ids=tokenizer.all_special_ids,
        vocab_size=len(tokenizer),
        mlm_probability=data_cfg.mlm_probability,
    )
    train = splits["train"]
    if data_cfg.train_multiple_of:  # every batch of a ladder then divides the epoch: no rung drops a tail
        train = train[: len(train) - len(train) % data_cfg.train_multiple_of]
        if len(train) == 0:
            raise ConfigError(
                f"data.train_multiple_of={data_cfg.train_multiple_of} is more than the "
                f"{len(splits['train'])} training sequences of {seq_len} tokens that {_describe(data_cfg)} "
                "yields: lower it (or null), or add documents"
            )
    return MLMData(
        train=MaskedLMDataset(train, seed=seed, **common),
        # Fixed masks for evaluation: every run and every eval point scores the same tokens.
        eval=MaskedLMDataset(splits["eval"], seed=SPLIT_SEED, **common),
        tokenizer=tokenizer,
        seq_len=seq_len,
        test=MaskedLMDataset(splits["test"], seed=SPLIT_SEED, **common) if "test" in splits else None,
    )
