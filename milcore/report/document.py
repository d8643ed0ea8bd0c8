"""One report, two renderings: a self-contained HTML page and a Markdown file with PNG figures.

Every command that reports (train, audit, continual, bench) builds a :class:`Report` block by
block; :meth:`Report.write` renders ``NAME.html`` (figures embedded as base64 PNG, inline CSS, no
external request) and ``NAME.md`` (figures saved beside it in ``NAME_files/``).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #6a3d9a;padding-bottom:.2em}h2{margin-top:1.6em;color:#4a2a70}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f1ecf7}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.6em 1em .6em 0;vertical-align:top}figcaption{font-size:.85em;color:#555;
max-width:520px}img{max-width:100%}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}
.flag{color:#b00020;font-weight:600}.muted{color:#777}code{background:#f4f4f4;padding:0 .2em}
.warn{background:#fdecea;border-left:5px solid #b00020;padding:.4em 1em;margin:1em 0}.warn ul{margin:.3em 0}
.warn.caution{background:#fff8e1;border-left-color:#f0b400}dl.terms dt{font-weight:600;float:left;clear:left;
margin-right:.5em}dl.terms dd{margin:0 0 .2em 0}
"""


def fmt(value: Any, digits: int = 3) -> str:
    """Human formatting: floats to ``digits`` decimals, NaN as an en dash, others via ``str``."""
    if isinstance(value, float | np.floating):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    return str(value)


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``"1 test"``, ``"2 tests"``, ``"1,200 bags"`` (``plural_form`` for irregular words: class -> classes)."""
    word = singular if int(count) == 1 else (plural_form or singular + "s")
    return f"{fmt(int(count))} {word}"


def fmt_ci(value: float, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.912 [0.850, 0.960]`` (the CI omitted when unknown)."""
    if ci is None or len(ci) != 2 or any(math.isnan(float(c)) for c in ci):
        return fmt(float(value), digits)
    return f"{fmt(float(value), digits)} [{fmt(float(ci[0]), digits)}, {fmt(float(ci[1]), digits)}]"


@dataclass
class _Block:
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


class Report:
    """A document built from headings, paragraphs, tables, figures and images.

    Args:
        title: the page title.
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[_Block] = []

    def heading(self, text: str, level: int = 2) -> Report:
        """Add a section heading."""
        self.blocks.append(_Block("heading", {"text": text, "level": level}))
        return self

    def paragraph(self, text: str, css: str = "") -> Report:
        """Add a paragraph of plain text (``css``: optional class such as ``note``)."""
        self.blocks.append(_Block("paragraph", {"text": text, "css": css}))
        return self

    def bullets(self, items: Sequence[str]) -> Report:
        """Add a bulleted list."""
        self.blocks.append(_Block("bullets", {"items": list(items)}))
        return self

    def warnings(self, title: str, items: Sequence[str], critical: bool = True) -> Report:
        """Add a boxed list that must be read first (``critical=False``: a milder, yellow box)."""
        if items:
            self.blocks.append(_Block("warnings", {"title": title, "items": list(items), "critical": critical}))
        return self

    def definitions(self, items: Sequence[tuple[str, str]]) -> Report:
        """Add a list of ``(term, one-line explanation)`` pairs (a glossary)."""
        self.blocks.append(_Block("definitions", {"items": [(str(t), str(d)) for t, d in items]}))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> Report:
        """Add a table; cells are formatted with :func:`fmt` unless already strings."""
        cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
        self.blocks.append(_Block("table", {"headers": list(headers), "rows": cells, "caption": caption}))
        return self

    def figure(self, fig: Any, caption: str = "", name: str | None = None) -> Report:
        """Add a matplotlib figure (rendered to PNG now, then closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return self.png(buf.getvalue(), caption, name)

    def image(self, pixels: np.ndarray, caption: str = "", name: str | None = None) -> Report:
        """Add an RGB image given as an (H, W, 3) uint8 array (e.g. a cell montage)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
        return self.png(buf.getvalue(), caption, name)

    def png(self, data: bytes, caption: str = "", name: str | None = None) -> Report:
        """Add an already-encoded PNG."""
        self.blocks.append(_Block("png", {"data": data, "caption": caption, "name": name}))
        return self

    # ------------------------------------------------------------------ rendering
    def to_html(self) -> str:
        """The self-contained HTML page."""
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
               f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"]  # fmt: skip
        for b in self.blocks:
            p = b.payload
            if b.kind == "heading":
                out.append(f"<h{p['level']}>{html.escape(p['text'])}</h{p['level']}>")
            elif b.kind == "paragraph":
                cls = f" class='{p['css']}'" if p["css"] else ""
                out.append(f"<p{cls}>{html.escape(p['text'])}</p>")
            elif b.kind == "bullets":
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in p["items"]) + "</ul>")
            elif b.kind == "warnings":
                cls = "warn" if p["critical"] else "warn caution"
                out.append(f"<div class='{cls}'><strong>{html.escape(p['title'])}</strong><ul>"
                           + "".join(f"<li>{html.escape(i)}</li>" for i in p["items"]) + "</ul></div>")  # fmt: skip
            elif b.kind == "definitions":
                out.append("<dl class='terms'>" + "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(d)}</dd>"
                                                          for t, d in p["items"]) + "</dl>")  # fmt: skip
            elif b.kind == "table":
                cap = f"<caption>{html.escape(p['caption'])}</caption>" if p["caption"] else ""
                head = "".join(f"<th>{html.escape(h)}</th>" for h in p["headers"])
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in p["rows"]
                )
                out.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b.kind == "png":
                src = base64.b64encode(p["data"]).decode("ascii")
                alt = html.escape(p["caption"] or "figure")
                out.append(f"<figure><img alt='{alt}' src='data:image/png;base64,{src}'>"
                           f"<figcaption>{html.escape(p['caption'])}</figcaption></figure>")  # fmt: skip
        out.append("</body></html>")
        return "\n".join(out)

    def to_markdown(self, figure_dir: str | None = None) -> tuple[str, dict[str, bytes]]:
        """Markdown text and the figures it links to (``{relative path: PNG bytes}``)."""
        lines = [f"# {self.title}", ""]
        files: dict[str, bytes] = {}
        figure = 0
        for b in self.blocks:
            p = b.payload
            if b.kind == "heading":
                lines += ["#" * p["level"] + " " + p["text"], ""]
            elif b.kind == "paragraph":
                lines += [("> " if p["css"] == "note" else "") + p["text"], ""]
            elif b.kind == "bullets":
                lines += [f"- {i}" for i in p["items"]] + [""]
            elif b.kind == "warnings":
                lines += [f"> **{p['title']}**", ">"] + [f"> - {i}" for i in p["items"]] + [""]
            elif b.kind == "definitions":
                lines += [f"- **{t}**: {d}" for t, d in p["items"]] + [""]
            elif b.kind == "table":
                if p["caption"]:
                    lines += [f"*{p['caption']}*", ""]
                lines.append("| " + " | ".join(p["headers"]) + " |")
                lines.append("|" + "|".join(["---"] + ["---:"] * (len(p["headers"]) - 1)) + "|")
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in p["rows"]]
                lines.append("")
            elif b.kind == "png" and figure_dir is not None:
                figure += 1  # numbered at render time, so blocks merged from other reports never collide
                rel = f"{figure_dir}/{p['name'] or 'figure'}_{figure:02d}.png"
                files[rel] = p["data"]
                lines += [f"![{p['caption'] or 'figure'}]({rel})", ""]
                if p["caption"]:
                    lines += [f"*{p['caption']}*", ""]
        return "\n".join(lines), files

    def write(self, folder: str | Path, name: str = "report") -> tuple[Path, Path]:
        """Write ``NAME.html`` and ``NAME.md`` (+ ``NAME_files/*.png``) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        html_path = folder / f"{name}.html"
        html_path.write_text(self.to_html(), encoding="utf-8")
        md, files = self.to_markdown(f"{name}_files")
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        md_path = folder / f"{name}.md"
        md_path.write_text(md, encoding="utf-8")
        return html_path, md_path
