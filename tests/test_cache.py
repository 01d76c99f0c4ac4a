"""The tokenized-data cache: keyed on its inputs (an edited file is seen), built atomically (a failed
first build leaves nothing that looks usable), and never half-used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import largebatch.data as data_module
from largebatch.config import TextDataConfig
from largebatch.data import build_mlm_data, corpus_cache_dir
from largebatch.data import tokenizer as wordpiece
from largebatch.errors import ConfigError

VOCAB = 200


def write_corpus(path: Path, words: list[str], documents: int = 40) -> Path:
    """``documents`` blank-line-separated paragraphs made of ``words`` (each word many times)."""
    paragraphs = [" ".join(words[(i + k) % len(words)] for k in range(24)) for i in range(documents)]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def text_cfg(tmp_path: Path, *files: Path, **kw) -> TextDataConfig:
    return TextDataConfig(name="text_files", files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"),
                          eval_fraction=0.2, **kw)


def words_seen(data) -> set[str]:
    text = data.tokenizer.decode(data.train.sequences.flatten().tolist(), skip_special_tokens=True)
    return set(text.split())


OLD = ["apple", "banana", "cherry", "damson", "elder", "fig", "grape", "hazel"]
NEW = ["zebra", "yak", "xerus", "walrus", "vole", "urial", "tapir", "seal"]


def leftovers(cache_root: Path) -> list[str]:
    return sorted(p.name for p in cache_root.iterdir()) if cache_root.exists() else []


def test_a_text_file_edited_in_place_is_seen_by_the_next_build(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    cfg = text_cfg(tmp_path, corpus)
    first = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert words_seen(first) <= set(OLD) and len(first.train) > 0
    old_dir = corpus_cache_dir(cfg, VOCAB)

    write_corpus(corpus, NEW)  # same path, same length: only the content and mtime change
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    second = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert words_seen(second) <= set(NEW) and words_seen(second) & set(NEW)
    assert corpus_cache_dir(cfg, VOCAB) != old_dir
    # The same file again: served from the cache, not rebuilt.
    again = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert torch.equal(again.train.sequences, second.train.sequences)


SAME_SIZE = ["mango", "lychee", "tomato", "orange", "lemon", "yam", "melon", "olive"]  # OLD's word lengths


def test_a_same_size_edit_with_the_old_mtime_restored_is_seen(tmp_path):
    """Size and mtime alone would reuse the stale cache (``touch -r``, ``rsync -t`` and checkouts restore
    mtimes): the key holds the content's hash."""
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    cfg = text_cfg(tmp_path, corpus)
    first = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert words_seen(first) <= set(OLD)
    old_dir, before = corpus_cache_dir(cfg, VOCAB), corpus.stat()

    write_corpus(corpus, SAME_SIZE)
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = corpus.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert corpus_cache_dir(cfg, VOCAB) != old_dir
    second = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert words_seen(second) <= set(SAME_SIZE) and words_seen(second) & set(SAME_SIZE)


def test_large_files_are_keyed_by_sampled_chunks_and_size(tmp_path, monkeypatch):
    """Past FULL_HASH_MAX_BYTES a file is hashed by fixed-offset chunks: an edit in one, with size and mtime
    kept, changes the fingerprint; so does the size. The parallel-corpus cache is keyed the same way."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from largebatch import fileio
    from largebatch.config import TranslationDataConfig
    from largebatch.data.parallel import cache_folder

    monkeypatch.setattr(fileio, "FULL_HASH_MAX_BYTES", 1000)
    monkeypatch.setattr(fileio, "SAMPLE_CHUNK_BYTES", 50)  # 16 chunks of 50 bytes, 600 bytes apart
    big = tmp_path / "big.txt"
    big.write_bytes(bytes(10_000))
    stat = big.stat()
    fingerprint = fileio.file_fingerprint(big)
    assert fingerprint[:2] == [10_000, stat.st_mtime_ns] and fingerprint[2].startswith("s")
    data_cfg = OmegaConf.structured(TranslationDataConfig(name="parallel_files", source="text_files", src_lang="en",
                                                          tgt_lang="es", vocab_size=8000, max_len=80,
                                                          cache_dir=str(tmp_path / "cache")))
    folder = cache_folder(data_cfg, SimpleNamespace(input_files=[big]))

    big.write_bytes(bytes(9_999) + b"x")  # inside the last chunk
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fileio.file_fingerprint(big) != fingerprint
    assert cache_folder(data_cfg, SimpleNamespace(input_files=[big])) != folder
    big.write_bytes(bytes(10_001))
    assert fileio.file_fingerprint(big)[2] != fingerprint[2]


@pytest.mark.parametrize("failing", ["train_wordpiece", "pack_sequences"])
def test_a_failed_first_build_leaves_no_cache_and_the_next_build_is_right(tmp_path, monkeypatch, failing):
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    cfg = text_cfg(tmp_path, corpus)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    target = wordpiece if failing == "train_wordpiece" else data_module
    monkeypatch.setattr(target, failing, boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert leftovers(tmp_path / "cache") == []  # neither the folder nor its temporary copy
    monkeypatch.undo()

    data = build_mlm_data(cfg, VOCAB, 16, seed=0)
    cache = corpus_cache_dir(cfg, VOCAB)
    assert leftovers(tmp_path / "cache") == [cache.name]
    assert sorted(p.name for p in cache.iterdir()) == ["cache.json", "seq16.pt", "tokenizer.json",
                                                       "tokenizer_config.json"]
    assert len(data.tokenizer) > len(wordpiece.SPECIAL_TOKENS) + len(OLD)
    assert words_seen(data) & set(OLD) and len(data.train) > 0 and len(data.eval) > 0
    assert data.tokenizer.unk_token_id not in data.train.sequences.flatten().tolist()


def test_a_cache_folder_missing_a_piece_is_rebuilt_and_new_lengths_are_added(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    cfg = text_cfg(tmp_path, corpus)
    cache = corpus_cache_dir(cfg, VOCAB)
    # A half-written folder from an older build: sequences but no tokenizer.
    cache.mkdir(parents=True)
    torch.save({"train": torch.zeros(0, 16, dtype=torch.int32), "eval": torch.zeros(0, 16)}, cache / "seq16.pt")
    (cache / "tokenizer_config.json").write_text("{}")
    data = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert len(data.train) > 0 and wordpiece.has_tokenizer(cache)
    token_file = (cache / "tokenizer.json").read_bytes()

    # A new sequence length: one more file beside the same tokenizer, nothing else touched.
    longer = build_mlm_data(cfg, VOCAB, 32, seed=0)
    assert longer.train.sequences.shape[1] == 32 and (cache / "tokenizer.json").read_bytes() == token_file
    assert sorted(p.name for p in cache.iterdir()) == ["cache.json", "seq16.pt", "seq32.pt", "tokenizer.json",
                                                       "tokenizer_config.json"]

    # A sequence file made by another tokenizer (or torn) is made again, not used.
    saved = torch.load(cache / "seq32.pt")
    torch.save({**saved, "tokenizer": "someone-else", "train": saved["train"][:1]}, cache / "seq32.pt")
    assert len(build_mlm_data(cfg, VOCAB, 32, seed=0).train) == len(longer.train)
    (cache / "seq16.pt").write_bytes(b"torn")
    assert torch.equal(build_mlm_data(cfg, VOCAB, 16, seed=0).train.sequences, data.train.sequences)


@pytest.mark.parametrize("damage", ["truncated", "not_a_tokenizer", "config_truncated"])
def test_a_damaged_cached_tokenizer_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog, damage):
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    cfg = text_cfg(tmp_path, corpus)
    first = build_mlm_data(cfg, VOCAB, 16, seed=0)
    cache = corpus_cache_dir(cfg, VOCAB)
    name = "tokenizer_config.json" if damage == "config_truncated" else "tokenizer.json"
    damaged = cache / name
    if damage == "not_a_tokenizer":
        damaged.write_text('{"version": "1.0"}')  # JSON, but no tokenizer in it
    else:
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a full disk, a killed copy
    with caplog.at_level("WARNING", logger="largebatch.data"):
        data = build_mlm_data(cfg, VOCAB, 16, seed=0)
    assert f"the cached tokenizer file {damaged} does not load" in caplog.text
    assert "building the tokenizer again" in caplog.text
    assert wordpiece.load_tokenizer(cache) is not None and len(data.tokenizer) == len(first.tokenizer)
    assert words_seen(data) & set(OLD) and len(data.train) == len(first.train)
    assert torch.load(cache / "seq16.pt")["tokenizer"] == wordpiece.tokenizer_id(cache)  # sequences made again
    assert leftovers(tmp_path / "cache") == [cache.name]  # the damaged folder was replaced, nothing left beside
    caplog.clear()
    again = build_mlm_data(cfg, VOCAB, 16, seed=0)  # sound now: loaded, silently
    assert torch.equal(again.train.sequences, data.train.sequences) and "does not load" not in caplog.text


def test_bundled_cache_key_follows_the_package_files(compose_cfg, tmp_path, monkeypatch):
    from largebatch.data import sources

    cfg = compose_cfg().data
    files = sources.input_files(cfg)
    assert files and all(f.is_file() for f in files)
    assert any(f.name == "summaries_en-us.json" for f in files)
    assert corpus_cache_dir(cfg, VOCAB) == corpus_cache_dir(cfg, VOCAB)
    # A package file reinstalled (same path, new size and mtime): a new cache folder.
    package_copy = tmp_path / "summaries_en-us.json"
    package_copy.write_text("{}")
    monkeypatch.setattr(sources, "_bundled_files", lambda source: [package_copy])
    before = corpus_cache_dir(cfg, VOCAB)
    package_copy.write_text('{"x": {}}')
    assert corpus_cache_dir(cfg, VOCAB) != before


def test_too_little_text_is_a_config_error_and_caches_nothing(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single paragraph of text\n")
    with pytest.raises(ConfigError, match=r"1 document\(s\), all held out.*eval_fraction"):
        build_mlm_data(text_cfg(tmp_path, one), VOCAB, 16, seed=0)
    short = write_corpus(tmp_path / "short.txt", OLD, documents=3)
    with pytest.raises(ConfigError, match="too little text for sequences of 512 tokens.*data.seq_len"):
        build_mlm_data(text_cfg(tmp_path, short), VOCAB, 512, seed=0)
    assert leftovers(tmp_path / "cache") == []  # no folder, no temporary copy
    # The cache itself is sound here (the truncation is applied after it): only the run is refused.
    corpus = write_corpus(tmp_path / "corpus.txt", OLD)
    with pytest.raises(ConfigError, match="train_multiple_of=4096"):
        build_mlm_data(text_cfg(tmp_path, corpus, train_multiple_of=4096), VOCAB, 16, seed=0)
