"""A tiny document model rendered to Markdown and to self-contained HTML, and number formats.

The report is built as a list of blocks (headings, paragraphs, lists, tables, figures) so the
same content renders to `report.md` and `report.html` (figures inlined as base64 PNG).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["Doc", "num", "pct", "pvalue", "interval"]


@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.blocks.append(("table", list(header), [[_cell(c) for c in r] for r in rows]))

    def figure(self, filename: str, caption: str) -> None:
        self.blocks.append(("fig", filename, caption))

    def link(self, text: str, url: str) -> None:
        self.blocks.append(("a", text, url))

    def markdown(self) -> str:
        return "\n\n".join(_MARKDOWN[block[0]](*block[1:]) for block in self.blocks) + "\n"

    def html(self, images: dict[str, bytes], title: str) -> str:
        body = [_html_block(block, images) for block in self.blocks]
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc[1:]])


_MARKDOWN = {
    "h": lambda level, text: f"{'#' * level} {text}",
    "p": lambda text: text,
    "ul": lambda items: "\n".join(f"- {item}" for item in items),
    "table": _md_table,
    "fig": lambda name, caption: f"![{caption}]({name})\n\n*{caption}*",
    "a": lambda text, url: f"[{text}]({url})",
}


def _html_block(block: tuple, images: dict[str, bytes]) -> str:
    kind, esc = block[0], html.escape
    if kind == "h":
        return f"<h{block[1]}>{esc(block[2])}</h{block[1]}>"
    if kind == "p":
        return f"<p>{esc(block[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>"
    if kind == "table":
        head = "".join(f"<th>{esc(c)}</th>" for c in block[1])
        rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>"
                       for r in block[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if kind == "a":
        return f'<p><a href="{esc(block[2])}">{esc(block[1])}</a></p>'
    data = base64.b64encode(images[block[1]]).decode("ascii")
    return (f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(block[2])}</figcaption></figure>")


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #bbb;padding:0.25em 0.6em;text-align:left}th{background:#eee}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{font-style:italic;font-size:0.9em}"
)


def _cell(value: object) -> str:
    return " ".join(str(value).split())


def num(value: float | None, digits: int = 3) -> str:
    """`digits` decimals, more for small numbers so that two significant digits show."""
    if value is None or not np.isfinite(value):
        return "inf" if value is not None and np.isinf(value) and value > 0 else "n/a"
    if value == 0:
        return f"{0:.{digits}f}"
    if abs(value) >= 1e6 or abs(value) < 1e-6:
        return f"{value:.2e}"
    decimals = max(digits, int(-np.floor(np.log10(abs(value)))) + 1)
    return f"{value:.{min(decimals, 7)}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}"


def pvalue(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def interval(lo: float, hi: float, digits: int = 3) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "n/a"
    return f"[{num(lo, digits)}, {num(hi, digits)}]"
