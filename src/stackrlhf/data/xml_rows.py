"""Streaming reader for the dump's XML files: one ``<row .../>`` at a time, memory flat in the file's size."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lxml import etree

from stackrlhf.errors import DumpError


class _CountingReader:
    """A binary file wrapper that reports bytes read, for progress bars and MB/s figures."""

    def __init__(self, fh, on_bytes: Callable[[int], None] | None):
        self._fh = fh
        self._on_bytes = on_bytes
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self.bytes_read += len(chunk)
        if self._on_bytes is not None and chunk:
            self._on_bytes(len(chunk))
        return chunk


def _ends_with_closing_tag(fh) -> bool:
    """A complete dump file ends with its root's closing tag (``</posts>``); a cut-off one does not."""
    fh.seek(0, os.SEEK_END)
    fh.seek(max(0, fh.tell() - 256))
    return re.search(rb"</[A-Za-z]+>\s*$", fh.read()) is not None


def iter_rows(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None) -> Iterator[etree._Attrib]:
    """Yield the attributes of each ``row`` element of a dump file, clearing parsed elements as it goes.

    The yielded mapping is only valid until the next iteration: copy what you need. Malformed,
    truncated or non-UTF-8 input raises :class:`DumpError` naming the file and line.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DumpError(f"{path}: cannot open ({exc.strerror})") from exc
    with fh:
        reader = _CountingReader(fh, on_bytes)
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
            msg = str(getattr(exc, "msg", None) or exc).split(", line")[0].strip()
            truncated = not _ends_with_closing_tag(fh)
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
