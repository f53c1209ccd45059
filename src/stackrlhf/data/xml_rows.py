"""Streaming reader for the dump's XML files: one ``<row .../>`` at a time, memory flat in the file's size.

A file can also be read in byte ranges cut at row boundaries (:func:`row_ranges`), one worker process each:
the first range keeps the file's head (XML declaration, any DOCTYPE, which is refused as before), the last its
end (so a truncated file is still caught), and the others get the root tags wrapped around them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lxml import etree

from stackrlhf.errors import DumpError


_ROW_START = re.compile(rb"\n[ \t]*<row[ \t\r\n/>]")
_ROOT = re.compile(rb"<([A-Za-z_][\w.-]*)[\s>/]")
_ENCODING = re.compile(rb"""encoding\s*=\s*["']([^"']+)["']""")
_COMMENT = re.compile(rb"<!--.*?-->", re.S)
_HEAD_BYTES = 1 << 16
MIN_RANGE_BYTES = 1 << 16  # smaller files are not worth a second process


class _RangeReader:
    """A binary reader over ``prefix + file[start:end] + suffix`` that reports the file bytes it reads, for
    progress bars and MB/s figures."""

    def __init__(self, fh, start: int, end: int, prefix: bytes, suffix: bytes,
                 on_bytes: Callable[[int], None] | None):
        fh.seek(start)
        self._fh, self._left, self._on_bytes = fh, end - start, on_bytes
        self._prefix, self._suffix = prefix, suffix

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            chunk, self._prefix = self._prefix, b""
            return chunk
        if self._left > 0:
            chunk = self._fh.read(self._left if size < 0 else min(size, self._left))
            self._left -= len(chunk)
            if chunk:
                if self._on_bytes is not None:
                    self._on_bytes(len(chunk))
                return chunk
            self._left = 0
        chunk, self._suffix = self._suffix, b""
        return chunk


def _root_tag(head: bytes) -> bytes | None:
    """The root element's name in a file's first bytes (``posts``): the first start tag, the declaration,
    DOCTYPE and comments aside."""
    m = _ROOT.search(_COMMENT.sub(b"", head))
    return m.group(1) if m else None


def row_ranges(path: str | os.PathLike, parts: int) -> list[tuple[int, int]]:
    """Cut ``path`` into at most ``parts`` byte ranges of about equal size, each starting at a row's line, for
    :func:`iter_rows`. One range (the whole file) when the file is small, not UTF-8, or its head cannot be read."""
    size = os.path.getsize(path)
    parts = min(parts, size // MIN_RANGE_BYTES)
    if parts <= 1:
        return [(0, size)]
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
        enc = _ENCODING.search(head[:200])
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (enc and enc.group(1).lower().replace(b"_", b"-")
                                                         not in (b"utf-8", b"utf8", b"us-ascii", b"ascii")):
            return [(0, size)]
        first = _ROW_START.search(head)
        if first is None or _root_tag(head[:first.start()]) is None:
            return [(0, size)]
        cuts = [0]
        for i in range(1, parts):
            target = max(size * i // parts, cuts[-1] + 1, first.start() + 1)
            cut = _next_row_start(fh, target, size)
            if cut is None:
                break
            if cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def _next_row_start(fh, pos: int, size: int) -> int | None:
    """The offset of the first row line (its newline's next byte) at or after ``pos``."""
    step = 1 << 20
    while pos < size:
        fh.seek(max(0, pos - 1))
        block = fh.read(step + 64)
        m = _ROW_START.search(block)
        if m is not None:
            return max(0, pos - 1) + m.start() + 1
        if len(block) < step + 64:
            return None
        pos += step
    return None


def _ends_with_closing_tag(fh) -> bool:
    """A complete dump file ends with its root's closing tag (``</posts>``); a cut-off one does not."""
    fh.seek(0, os.SEEK_END)
    fh.seek(max(0, fh.tell() - 256))
    return re.search(rb"</[A-Za-z]+>\s*$", fh.read()) is not None


def _count_newlines(fh, upto: int) -> int:
    count, left = 0, upto
    while left > 0:
        block = fh.read(min(left, 1 << 24))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def iter_rows(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None,
              span: tuple[int, int] | None = None) -> Iterator[etree._Attrib]:
    """Yield the attributes of each ``row`` element of a dump file (or of one of its :func:`row_ranges`),
    clearing parsed elements as it goes.

    The yielded mapping is only valid until the next iteration: copy what you need. Malformed,
    truncated or non-UTF-8 input raises :class:`DumpError` naming the file and line.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DumpError(f"{path}: cannot open ({exc.strerror})") from exc
    with fh:
        size = os.fstat(fh.fileno()).st_size
        start, end = span or (0, size)
        prefix = suffix = b""
        if (start, end) != (0, size):
            root = _root_tag(fh.read(_HEAD_BYTES)) or b"posts"
            prefix = b"<" + root + b">" if start > 0 else b""
            suffix = b"</" + root + b">" if end < size else b""
        reader = _RangeReader(fh, start, end, prefix, suffix, on_bytes)
        context = etree.iterparse(reader, events=("end",), tag="row", huge_tree=True, remove_comments=True)
        try:
            for _, elem in context:
                yield elem.attrib
                elem.clear(keep_tail=False)
                parent = elem.getparent()
                if parent is not None:
                    while elem.getprevious() is not None:
                        del parent[0]
        except etree.XMLSyntaxError as exc:
            line = exc.lineno if getattr(exc, "lineno", None) else "?"
            if line != "?" and start > 0:  # the range's line 1 is the file's line of ``start``
                fh.seek(0)
                line += _count_newlines(fh, start)
            msg = str(getattr(exc, "msg", None) or exc).split(", line")[0].strip()
            truncated = end == size and not _ends_with_closing_tag(fh)
            if "entity" in msg.lower() or "dtd" in msg.lower():
                hint = ("DTDs and entity declarations are not allowed in dump files (they are refused, not "
                        "expanded, to block XXE and entity-expansion attacks); remove the <!DOCTYPE> block")
            elif "encoding" in msg.lower() or "utf-8" in msg.lower():
                hint = "invalid UTF-8 bytes; dump files must be UTF-8"
            elif truncated:
                hint = "the file ends early (truncated?); re-download or re-extract the dump"
            else:
                hint = "malformed XML"
            raise DumpError(f"{path}: line {line}: {hint} ({msg})") from exc
