"""Parallel text for translation: sentence pairs, their held-out splits and a joint subword vocabulary.

Sources (``data.source``):
    sword       Bible verses of two SWORD modules that share a versification, paired by verse
                (``data=verses``: King James Version -> Reina-Valera 1909, Debian's sword-text-kjv and
                sword-text-sparv, public domain; 31,084 non-empty pairs). Whole CHAPTERS are held out
                for valid and test, drawn with a fixed seed, so no chapter (and no pair of neighbouring
                verses) is in two splits.
    text_files  line-aligned plain text, tensorflow/nmt's layout: ``{prefix}.{lang}`` for the train,
                valid and test prefixes in ``data.folder`` (e.g. train.en / train.de, newstest2013.en ...).
    hub         a ``datasets`` dataset with a ``translation`` column of {lang: text} records (WMT16 is
                ``wmt16`` / ``de-en``); ``data.hub_data_files`` loads local files in that format.

Tokenizer: one BPE vocabulary over both languages (``tokenizers``; NFC normalisation, SentencePiece-style
metaspace pre-tokenisation with punctuation split off, so decoding gives back the text, accents and
all), trained on the TRAINING pairs only and cached under ``data.cache_dir`` in a folder keyed by the
source, split and vocabulary settings and the input files' size, mtime and content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from largebatch.data.batching import split_micro
from largebatch.data.sword import module_dir, sword_verses
from largebatch.errors import ConfigError, DataNotFoundError
from largebatch.fileio import atomic_file, file_fingerprint
from largebatch.labels import BOS_ID, EOS_ID, IGNORE_INDEX, PAD_ID, UNK_ID

log = logging.getLogger(__name__)

SOURCES = ("sword", "text_files", "hub")
# The verse pairs: languages with a SWORD module in the KJV versification.
VERSE_MODULES = {"en": "engKJV2006eb", "es": "spaRV1909eb"}
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
CACHE_VERSION = 2  # 2: the input files' content hash joins the key (older folders: rebuilt once)

Pair = tuple[str, str]


@dataclass
class ParallelSplits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    description: str
    input_files: list[Path]
    keys: dict[str, list] | None = None  # sword: the (book, chapter, verse) of every pair, per split


# ---------------------------------------------------------------------- sources
def verse_splits(src_lang: str, tgt_lang: str, *, seed: int, valid_fraction: float,
                 test_fraction: float) -> ParallelSplits:
    """Verse pairs of two SWORD modules; valid and test are whole chapters drawn with ``seed``."""
    for lang in (src_lang, tgt_lang):
        if lang not in VERSE_MODULES:
            raise ConfigError(f"data=verses has no {lang!r} text; its languages are "
                              f"{', '.join(f'{k} ({v})' for k, v in VERSE_MODULES.items())}. Set data.src_lang and "
                              "data.tgt_lang to two of them, or use data=parallel_files for other pairs")
    if src_lang == tgt_lang:
        raise ConfigError(f"data.src_lang and data.tgt_lang are both {src_lang!r}; choose two languages")
    source, target = sword_verses(VERSE_MODULES[src_lang]), sword_verses(VERSE_MODULES[tgt_lang])
    keys = [key for key in source if key in target]
    chapters = list(dict.fromkeys((book, chapter) for book, chapter, _ in keys))
    held_out = random.Random(seed).sample(chapters, len(chapters))
    n_valid = max(1, round(valid_fraction * len(chapters)))
    n_test = max(1, round(test_fraction * len(chapters)))
    valid, test = set(held_out[:n_valid]), set(held_out[n_valid:n_valid + n_test])
    splits: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    split_keys: dict[str, list] = {"train": [], "valid": [], "test": []}
    for key in keys:
        chapter = key[:2]
        name = "valid" if chapter in valid else "test" if chapter in test else "train"
        splits[name].append((source[key], target[key]))
        split_keys[name].append(key)
    files = [path for lang in (src_lang, tgt_lang) for path in sorted(module_dir(VERSE_MODULES[lang]).glob("*"))]
    return ParallelSplits(**splits, input_files=files, keys=split_keys,
                          description=f"verses {VERSE_MODULES[src_lang]} -> {VERSE_MODULES[tgt_lang]}, "
                                      f"{n_valid} + {n_test} held-out chapters of {len(chapters)} (seed {seed})")


def text_file_splits(folder: str | Path, src_lang: str, tgt_lang: str, prefixes: dict[str, str]) -> ParallelSplits:
    """``{prefix}.{lang}`` line-aligned files (tensorflow/nmt's layout) for the train, valid, test prefixes."""
    folder = Path(folder)
    splits, files = {}, []
    for split, prefix in prefixes.items():
        paths = [folder / f"{prefix}.{lang}" for lang in (src_lang, tgt_lang)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataNotFoundError(f"data.source=text_files: {', '.join(missing)} not found; data.folder holds "
                                    "{prefix}.{lang} files with one sentence a line (data.prefixes names them)")
        lines = [_read_lines(p) for p in paths]
        if len(lines[0]) != len(lines[1]):
            raise ConfigError(f"{paths[0]} has {len(lines[0])} lines but {paths[1]} has {len(lines[1])}: "
                              "parallel files must be line-aligned")
        splits[split] = [(s.strip(), t.strip()) for s, t in zip(*lines) if s.strip() and t.strip()]
        files += paths
    return ParallelSplits(**splits, input_files=files, description=f"text files in {folder} ({src_lang} -> {tgt_lang})")


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; bytes that are not UTF-8 are a ConfigError naming the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}, line {line}: a binary file, or another "
                          f"encoding?): convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or point data.folder "
                          "at UTF-8 copies") from None


def hub_splits(dataset: str, config: str | None, src_lang: str, tgt_lang: str, split_names: dict[str, str],
               data_files: dict | None = None) -> ParallelSplits:
    """A ``datasets`` translation dataset: records {"translation": {lang: text, ...}}."""
    from datasets import load_dataset

    try:
        loaded = load_dataset(dataset, config, data_files=data_files)
    except Exception as error:  # offline hub, unknown id, bad files: one message that says what to do
        raise DataNotFoundError(
            f"could not load the translation dataset {dataset!r} (config {config!r}): {type(error).__name__}: "
            f"{error}. Without a hub, point data.hub_dataset=json and data.hub_data_files at local files in the "
            "same format, or use data=parallel_files") from error
    splits = {}
    for split, name in split_names.items():
        if name not in loaded:
            raise ConfigError(f"dataset {dataset!r} has no split {name!r} (it has {', '.join(loaded)}); "
                              f"set data.splits.{split}")
        records = loaded[name]["translation"]
        if records and not {src_lang, tgt_lang} <= set(records[0]):
            raise ConfigError(f"dataset {dataset!r} translates {' / '.join(records[0])}, not {src_lang} -> "
                              f"{tgt_lang}; set data.src_lang and data.tgt_lang")
        splits[split] = [(r[src_lang].strip(), r[tgt_lang].strip()) for r in records
                         if r[src_lang].strip() and r[tgt_lang].strip()]
    files = sorted(Path(f) for v in (data_files or {}).values() for f in ([v] if isinstance(v, str) else v))
    return ParallelSplits(**splits, input_files=files, description=f"{dataset} {config or ''} ({src_lang} -> {tgt_lang})")


def load_parallel(data_cfg) -> ParallelSplits:
    """The pairs ``data_cfg`` names (see the module docstring)."""
    d = data_cfg
    if d.source == "sword":
        return verse_splits(d.src_lang, d.tgt_lang, seed=d.split_seed, valid_fraction=d.valid_fraction,
                            test_fraction=d.test_fraction)
    if d.source == "text_files":
        if not d.folder:
            raise ConfigError("data.source=text_files needs data.folder=<folder with {prefix}.{lang} files>")
        return text_file_splits(d.folder, d.src_lang, d.tgt_lang, dict(d.splits))
    if d.source == "hub":
        files = dict(d.hub_data_files) if d.hub_data_files else None
        return hub_splits(d.hub_dataset, d.hub_config, d.src_lang, d.tgt_lang, dict(d.splits), files)
    raise ConfigError(f"data.source={d.source!r} is not one of {' | '.join(SOURCES)}")


# ---------------------------------------------------------------------- tokenizer
def train_bpe(texts: list[str], vocab_size: int):
    """A BPE ``tokenizers.Tokenizer`` whose ``decode`` gives back NFC-normalised text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    specials = sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.get)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for token, index in SPECIAL_TOKENS.items():
        assert tok.token_to_id(token) == index, "special tokens come first, in id order"
    return tok


def cache_folder(data_cfg, splits: ParallelSplits) -> Path:
    """Keyed by every setting the vocabulary depends on and the input files' size, mtime and content hash."""
    settings = {k: data_cfg[k] for k in ("source", "src_lang", "tgt_lang", "split_seed", "valid_fraction",
                                         "test_fraction", "folder", "hub_dataset", "hub_config", "vocab_size",
                                         "max_train")}
    settings["splits"] = dict(data_cfg.splits)
    files = [[str(p), *file_fingerprint(p)] for p in splits.input_files]
    key = json.dumps({"version": CACHE_VERSION, "settings": settings, "files": files}, sort_keys=True, default=str)
    return Path(data_cfg.cache_dir) / f"parallel-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def load_or_train_bpe(splits: ParallelSplits, vocab_size: int, folder: Path):
    """The cached tokenizer in ``folder``, trained on the training pairs of both languages the first time
    (and again, with a warning naming the file, when the cached one does not load: truncated, edited)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # any damage: the file is a cache, made again below
            reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            log.warning("the cached tokenizer %s does not load (%s): training it again", path, reason)
    texts = [text for pair in splits.train for text in pair]
    log.info("training a %d-token BPE vocabulary on %d training sentences", vocab_size, len(texts))
    tokenizer = train_bpe(texts, vocab_size)
    with atomic_file(path) as f:
        f.write(tokenizer.to_str())
    return tokenizer


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def decode(tokenizer, ids: list[list[int]]) -> list[str]:
    return tokenizer.decode_batch(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------- batches
class PairDataset:
    """Token ids of sentence pairs; a sample is {"src": [S], "tgt": [T]} (no special tokens)."""

    def __init__(self, src: list[list[int]], tgt: list[list[int]]):
        assert len(src) == len(tgt)
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, index: int) -> dict:
        return {"src": torch.tensor(self.src[index]), "tgt": torch.tensor(self.tgt[index])}


def pad_pairs(samples: list[dict]) -> dict:
    """One micro-batch, padded to its longest sentence: src [B, S] (PAD), src_lengths [B], tgt_in [B, T]
    (BOS + target, PAD) and tgt_out [B, T] (target + EOS, IGNORE_INDEX where there is no target)."""
    bos, eos = torch.tensor([BOS_ID]), torch.tensor([EOS_ID])
    return {
        "src": pad_sequence([s["src"] for s in samples], batch_first=True, padding_value=PAD_ID),
        "src_lengths": torch.tensor([len(s["src"]) for s in samples]),
        "tgt_in": pad_sequence([torch.cat([bos, s["tgt"]]) for s in samples], batch_first=True, padding_value=PAD_ID),
        "tgt_out": pad_sequence([torch.cat([s["tgt"], eos]) for s in samples], batch_first=True,
                                padding_value=IGNORE_INDEX),
    }


def collate_pairs(samples: list[dict], micro_batch: int, bucket: bool = False) -> list[dict]:
    """One step's pairs of this rank -> padded micro-batches. ``bucket``: sort them by length first, so
    a micro-batch holds sentences of similar length (less padding); the step's samples, and so its
    gradient, are the same either way."""
    if bucket:
        samples = sorted(samples, key=lambda s: (len(s["src"]), len(s["tgt"])))
    return [pad_pairs(samples[part]) for part in split_micro(len(samples), micro_batch)]
