"""A WordPiece tokenizer trained locally with `tokenizers` (BERT's normaliser and pre-tokeniser),
cached on disk and loaded as a ``BertTokenizerFast``.

transformers 5.x silently ignores ``BertTokenizerFast(vocab_file=...)`` (5-token vocabulary, every
word [UNK]); we go through ``tokenizer_object=`` and ``from_pretrained(dir)`` instead, and the tests
check that real words survive a round trip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# What ``save_pretrained`` writes; a folder holds a tokenizer only when it has all of them.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def train_wordpiece(documents: list[str], vocab_size: int) -> BertTokenizerFast:
    if not documents:
        raise ValueError("train_wordpiece needs at least one document (got none)")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2)
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds every file of a saved tokenizer."""
    return all((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_id(folder: Path) -> str:
    """A digest of the saved vocabulary and settings: what derived files record to say which tokenizer
    made them (WordPiece training is not deterministic across builds)."""
    return hashlib.sha1((Path(folder) / "tokenizer.json").read_bytes()).hexdigest()[:16]


def save_tokenizer(tokenizer: BertTokenizerFast, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder beside ``folder``'s files, then each file renamed into
    place, ``tokenizer.json`` last: :func:`has_tokenizer` is true only once every file is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", suffix=".tmp", dir=folder))
    try:
        tokenizer.save_pretrained(staging)
        missing = [name for name in TOKENIZER_FILES if not (staging / name).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained wrote no {missing} (transformers changed its layout?)")
        names = sorted(p.name for p in staging.iterdir())
        for name in sorted(names, key=lambda n: n == "tokenizer.json"):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(folder: Path) -> BertTokenizerFast:
    return BertTokenizerFast.from_pretrained(folder)


def load_cached_tokenizer(folder: Path) -> BertTokenizerFast | None:
    """The tokenizer saved in the cache ``folder``, or None, with a warning naming the damaged file, when it
    does not load (a truncated or edited ``tokenizer.json``): the caller builds it again."""
    folder = Path(folder)
    for name in TOKENIZER_FILES:  # a file that is not JSON is named itself; other damage names tokenizer.json
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return _damaged(folder / name, error)
    try:
        return load_tokenizer(folder)
    except Exception as error:  # whatever transformers / tokenizers raise for a file they cannot use
        return _damaged(folder / "tokenizer.json", error)


def _damaged(path: Path, error: BaseException) -> None:
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    log.warning("the cached tokenizer file %s does not load (%s): building the tokenizer again", path, reason)
    return None


def load_or_train_tokenizer(documents: list[str], vocab_size: int, cache_dir: Path) -> BertTokenizerFast:
    """Train on ``documents`` once; later calls with the same cache_dir load the saved tokenizer (trained
    again, with a warning, when it does not load)."""
    if has_tokenizer(cache_dir) and (tokenizer := load_cached_tokenizer(cache_dir)) is not None:
        return tokenizer
    tokenizer = train_wordpiece(documents, vocab_size)
    save_tokenizer(tokenizer, cache_dir)
    return load_tokenizer(cache_dir)
