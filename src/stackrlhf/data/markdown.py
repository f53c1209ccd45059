"""Post HTML -> Markdown with html-to-markdown (Rust core): fenced code blocks, links and lists survive."""

from __future__ import annotations

import re

import html_to_markdown

_OPTIONS = html_to_markdown.ConversionOptions(
    extract_metadata=False,
    code_block_style="backticks",
    heading_style="atx",
    bullets="-",
    autolinks=True,
    newline_style="backslash",  # a hard line break survives the trailing-space cleanup
    tier_strategy="tier1",  # the fast path: ~35% faster on the shared dumps; differs only in escaping "1." paragraphs
)


def _make_converter():
    """Convert the options to the Rust side once: the public ``convert`` re-converts them on every call,
    which costs more than the conversion of a typical post. Falls back to the public API if the
    private hook ever goes away."""
    try:
        from html_to_markdown import api

        rust_options = api._to_rust_conversion_options(_OPTIONS, _visitor_override=None)
        rust_convert = api._rust.convert
        rust_convert(html="<p>x</p>", options=rust_options, visitor=None)
        return lambda html: rust_convert(html=html, options=rust_options, visitor=None).content
    except Exception:  # pragma: no cover - depends on the installed html-to-markdown
        return lambda html: html_to_markdown.convert(html, _OPTIONS).content


_convert = _make_converter()
_TRAILING_WS = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def clean_whitespace(text: str) -> str:
    """Strip trailing spaces per line, collapse runs of blank lines, trim both ends."""
    # The substring tests are much cheaper than the regexes, and most posts need neither.
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if "\u00a0" in text:
        text = text.replace("\u00a0", " ")
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_WS.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def html_to_md(html: str) -> str:
    """Convert one post body. Empty or missing bodies become the empty string."""
    if not html:
        return ""
    return clean_whitespace(_convert(html))
