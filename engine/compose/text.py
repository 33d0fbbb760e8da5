"""HTML -> plain text: the text part of a message whose template has only HTML.

Receivers (and spam filters) expect a text/plain alternative; deriving it keeps
authors from maintaining two copies. The output is meant to be read: paragraphs
and list items on their own lines, ``text (url)`` for links, nothing from
``<script>``/``<style>``/``<head>``.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_BLOCKS = frozenset(
    "address article aside blockquote dd div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 "
    "header hr li main nav ol p pre section table tbody thead tfoot tr ul".split()
)
_SKIP = frozenset({"script", "style", "head", "title", "template"})
_PARAGRAPHS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "ul", "ol", "dl"})
_SPACES_RE = re.compile(r"[ \t\n\r\f\v]+")  # not \s: a no-break space is content


class _TextExtractor(HTMLParser):
    """Collects text; block elements become line breaks, links become ``text (url)``.

    Line breaks are kept *pending* and only written before the next visible
    text, so nested blocks (``<td><p>``) never pile up blank lines.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0
        self.pending = 0  # newlines owed before the next text
        self.at_line_start = True
        self.links: list[tuple[str, int]] = []  # (href, len(out) when <a> opened)

    def _break(self, count: int) -> None:
        if self.out:
            self.pending = max(self.pending, count)

    def _emit(self, text: str) -> None:
        if self.pending:
            if self.out:
                self.out[-1] = self.out[-1].rstrip(" ")
            self.out.append("\n" * self.pending)
            self.pending = 0
            self.at_line_start = True
        if self.at_line_start and not self.pre:
            text = text.lstrip(" ")
            if not text:
                return
        self.out.append(text)
        self.at_line_start = text.endswith("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
            return
        if tag == "br":
            self._emit("\n")  # explicit: a <br> is a line break even between two texts
        elif tag == "pre":
            self.pre += 1
            self._break(2)
        elif tag == "li":
            self._break(1)
            self._emit("- ")
        elif tag in ("td", "th"):
            self._emit(" ")
        elif tag == "hr":
            self._break(1)
            self._emit("----")
            self._break(1)
        elif tag in _BLOCKS:
            self._break(2 if tag in _PARAGRAPHS else 1)
        if tag == "a":
            href = (dict(attrs).get("href") or "").strip()
            self.links.append((href, len(self.out)))
        elif tag == "img":
            alt = (dict(attrs).get("alt") or "").strip()
            if alt:
                self._emit(alt)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
            self._break(2)
        elif tag == "a" and self.links:
            href, start = self.links.pop()
            label = " ".join("".join(self.out[start:]).split())
            if href and not href.startswith("#") and label != href and href.removeprefix("mailto:") != label:
                self._emit(f" ({href})" if label else href)
        elif tag in _BLOCKS and tag != "li":
            self._break(2 if tag in _PARAGRAPHS else 1)

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.pre:
            self._emit(data)
            return
        text = _SPACES_RE.sub(" ", data)
        if text.strip(" "):
            self._emit(text)
        elif self.out and not self.at_line_start and not self.pending:
            self._emit(" ")

    def text(self) -> str:
        text = "".join(self.out)
        text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
        return text + "\n" if text else ""


def html_to_text(html: str) -> str:
    """A readable plain-text version of an HTML body: paragraphs, list dashes, ``text (url)``."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()
