"""A reader for SWORD zText Bible modules, the format Debian's ``sword-text-*`` packages install.

Modules used by this project (all public domain, from CrossWire / eBible.org):
    engWEB2015eb   World English Bible        apt-get install sword-text-web   (NRSVA versification)
    engKJV2006eb   King James Version (1769)  apt-get install sword-text-kjv   (KJV versification)
    spaRV1909eb    Reina-Valera 1909          apt-get install sword-text-sparv (KJV versification)

zText layout, one set of files per testament (``ot``, ``nt``) in the module's DataPath:
    {t}.bzs  block index, 12 bytes per block:  <III  offset, compressed size, uncompressed size
    {t}.bzv  verse index, 10 bytes per slot:   <IIH  block number, offset in block, size
    {t}.bzz  the zlib-compressed blocks
Slots run module header, testament header, then per book a book-heading slot and per chapter a
chapter-heading slot followed by one slot per verse. Rather than ship the versification tables
(KJV, NRSVA, ...) we read the structure from the data itself: osis2mod writes each book's
``<div type="book" sID=..>`` start tag into the book-heading slot and each ``<chapter sID="Gen.1"/>``
start tag into the chapter-heading slot, so every slot can be labelled (book, chapter, verse).
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from functools import lru_cache
from pathlib import Path

from largebatch.errors import DataNotFoundError

SWORD_ROOTS = (Path("/usr/share/sword"), Path.home() / ".sword")
_APT_PACKAGE = {
    "engWEB2015eb": "sword-text-web",
    "engKJV2006eb": "sword-text-kjv",
    "spaRV1909eb": "sword-text-sparv",
}

_BOOK_START = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\bsID=)[^>]*>")
_BOOK_END = re.compile(r"<div\b(?=[^>]*\btype=\"book\")(?=[^>]*\beID=)[^>]*>")
_CHAPTER_START = re.compile(r"<chapter\b[^>]*\bsID=\"([^\".]+)\.(\d+)\"")
# Footnotes and editorial section headings are not part of the verse; canonical titles
# (e.g. the Psalm superscriptions) are, so only non-canonical <title> elements are dropped.
_DROPPED = re.compile(r"<note\b.*?</note>|<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>", re.S)
# Word-level markup (Strong's <w>, italics <transChange>, ...) sits flush against punctuation, so
# it is removed without a trace; every other tag (line, paragraph, milestone) separates words.
_INLINE_TAG = re.compile(r"</?(?:w|transChange|divineName|q|seg|foreign|rdg|name|hi|catchWord)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")

VerseKey = tuple[str, int, int]  # (OSIS book, chapter, verse), e.g. ("Gen", 1, 1)


def _install_hint(name: str) -> str:
    package = _APT_PACKAGE.get(name)
    if package:
        return f"install it with `apt-get install {package}` (or `make install`)"
    return "install the SWORD module (a Debian sword-text-* package, or CrossWire's installmgr)"


def module_dir(module: str | Path) -> Path:
    """The data folder of a zText module, given that folder or a module name like ``engKJV2006eb``.

    A name is looked up in ``mods.d/*.conf`` under the SWORD roots (DataPath=), falling back to the
    usual ``modules/texts/ztext/<name>`` location.
    """
    path = Path(module)
    if (path / "ot.bzv").exists() or (path / "nt.bzv").exists():
        return path
    name = str(module)
    for root in SWORD_ROOTS:
        for conf in sorted((root / "mods.d").glob("*.conf")):
            text = conf.read_text(encoding="utf-8", errors="replace")
            if not re.search(rf"^\[{re.escape(name)}\]\s*$", text, re.M | re.I):
                continue
            match = re.search(r"^DataPath=(.+)$", text, re.M)
            if match:
                candidate = (root / match.group(1).strip()).resolve()
                if (candidate / "ot.bzv").exists() or (candidate / "nt.bzv").exists():
                    return candidate
        candidate = root / "modules" / "texts" / "ztext" / name.lower()
        for folder in (candidate, candidate.with_name(name)):
            if (folder / "ot.bzv").exists() or (folder / "nt.bzv").exists():
                return folder
    raise DataNotFoundError(
        f"SWORD module {name!r} not found (looked for a zText module under "
        f"{', '.join(str(r) for r in SWORD_ROOTS)}): {_install_hint(name)}."
    )


def osis_to_text(osis: str) -> str:
    """Plain text of one OSIS fragment: footnotes and editorial headings dropped, tags stripped."""
    text = _TAG.sub(" ", _INLINE_TAG.sub("", _DROPPED.sub(" ", osis)))
    return " ".join(html.unescape(text).split())


def _testament_slots(folder: Path, testament: str) -> list[str]:
    """Raw OSIS of every slot of one testament, in index order ('' for empty slots)."""
    try:
        block_index = (folder / f"{testament}.bzs").read_bytes()
        verse_index = (folder / f"{testament}.bzv").read_bytes()
        compressed = (folder / f"{testament}.bzz").read_bytes()
    except FileNotFoundError:
        return []  # a module may hold one testament only
    blocks = [struct.unpack_from("<III", block_index, i) for i in range(0, len(block_index) - 11, 12)]
    cache: dict[int, bytes] = {}
    slots = []
    for block, offset, size in struct.iter_unpack("<IIH", verse_index[: len(verse_index) // 10 * 10]):
        if size == 0 or block >= len(blocks):
            slots.append("")
            continue
        if block not in cache:
            start, length, _ = blocks[block]
            cache[block] = zlib.decompress(compressed[start : start + length])
        slots.append(cache[block][offset : offset + size].decode("utf-8", errors="replace"))
    return slots


@lru_cache(maxsize=8)
def _read_module(folder: Path) -> tuple[tuple[VerseKey, str], ...]:
    verses: list[tuple[VerseKey, str]] = []
    for testament in ("ot", "nt"):
        book, chapter, verse = None, 0, 0
        for osis in _testament_slots(folder, testament):
            if _BOOK_START.search(osis):
                book = None  # a book-heading slot: verses wait for the next chapter heading
                continue
            chapter_start = _CHAPTER_START.search(osis)
            if chapter_start:
                book, chapter, verse = chapter_start.group(1), int(chapter_start.group(2)), 0
                continue
            if book is None:
                continue  # module / testament headings
            verse += 1
            # Back matter with no slot of its own (WEB's glossary) lands in the last verse, after the
            # book's end tag: cut it off.
            book_end = _BOOK_END.search(osis)
            if book_end:
                osis = osis[: book_end.start()]
            verses.append(((book, chapter, verse), osis_to_text(osis)))
    if not verses:
        raise DataNotFoundError(
            f"{folder} holds no verses with osis2mod chapter markers; is it a zText Bible module?"
        )
    return tuple(verses)


def sword_verses(module: str | Path, keep_empty: bool = False) -> dict[VerseKey, str]:
    """Verse text of a zText module, keyed by (OSIS book, chapter, verse) in canonical order.

    ``module`` is a module name (``engWEB2015eb``) or its data folder. Empty slots (verses a
    translation leaves out or moves) are dropped unless ``keep_empty``.
    """
    verses = _read_module(module_dir(module).resolve())
    return {key: text for key, text in verses if text or keep_empty}


def parallel_verses(src_module: str | Path, tgt_module: str | Path) -> list[tuple[str, str]]:
    """Verse-aligned (source, target) text pairs of two modules, in canonical order.

    Verses are aligned by key, so both modules should share a versification (KJV and RV1909 do);
    a slot empty in either module is dropped.
    """
    source = sword_verses(src_module)
    target = sword_verses(tgt_module)
    return [(text, target[key]) for key, text in source.items() if key in target]


def chapter_documents(module: str | Path) -> list[str]:
    """One document per chapter: the chapter's verses joined with spaces."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for (book, chapter, _), text in sword_verses(module).items():
        chapters.setdefault((book, chapter), []).append(text)
    return [" ".join(texts) for texts in chapters.values()]
