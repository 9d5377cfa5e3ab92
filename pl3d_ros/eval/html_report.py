"""index.html for a report folder: report.md rendered to one self-contained page (inline CSS, no
scripts, no external resources; images are the folder's own PNGs, by relative path).

No markdown library is a dependency, so ``markdown_to_html`` converts the subset the reports
use: ``#``-headings, paragraphs, ``-`` lists, pipe tables, fenced code blocks, images, links,
inline code and bold. Everything else is escaped text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

_INLINE = re.compile(r"`([^`]+)`|!\[([^\]]*)\]\(([^)\s]+)\)|\[([^\]]+)\]\(([^)\s]+)\)|\*\*([^*]+)\*\*")

_CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 1.5em auto;
       max-width: 1640px; padding: 0 1em; color: #1d1d1d; background: #fafafa; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
table.figures { width: 100%; table-layout: fixed; }
table.figures td, table.figures th { text-align: left; }
pre { background: #f0f0f0; padding: 0.6em; overflow-x: auto; font-size: 13px; }
code { background: #f0f0f0; padding: 0 0.2em; }
img { max-width: 100%; display: block; margin: 0.4em 0; }
"""


def _inline(text: str) -> str:
    """Escape a line of text and convert its inline markup."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        code, alt, src, label, href, bold = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif src is not None:
            s = html.escape(src, quote=True)  # an image links to itself: click for full size
            out.append(f'<a href="{s}"><img src="{s}" alt="{html.escape(alt, quote=True)}" loading="lazy"></a>')
        elif href is not None:
            out.append(f'<a href="{html.escape(href, quote=True)}">{html.escape(label)}</a>')
        else:
            out.append(f"<strong>{html.escape(bold)}</strong>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """The body HTML of the markdown subset described in the module docstring."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        heading = re.match(r"(#{1,6})\s+(.*)", s)
        if heading:
            flush()
            n = len(heading.group(1))
            out.append(f"<h{n}>{_inline(heading.group(2))}</h{n}>")
        elif s.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|?[\s:|-]+\|?", lines[i + 1].strip()):
            flush()
            rows = [f"<tr>{''.join(f'<th>{_inline(c)}</th>' for c in _cells(s))}</tr>"]
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(f"<tr>{''.join(f'<td>{_inline(c)}</td>' for c in _cells(lines[i]))}</tr>")
                i += 1
            # a table of pictures fills the page, its columns equal (pictures side by side)
            figures = ' class="figures"' if any("<img" in r for r in rows) else ""
            out.append(f"<table{figures}>" + "".join(rows) + "</table>")
            continue
        elif s.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].strip().startswith("- "):
                items.append(f"<li>{_inline(lines[i].strip()[2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif not s:
            flush()
        else:
            para.append(s)
        i += 1
    flush()
    return "\n".join(out)


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_index(out_dir: str | Path, markdown: str, title: str) -> Path:
    """OUT/index.html from the report's markdown (its relative paths resolve inside OUT)."""
    path = Path(out_dir) / "index.html"
    path.write_text(html_page(title, markdown_to_html(markdown)))
    return path


def figures_markdown(out_dir: str | Path, names: Sequence[str], heading: str = "Plots") -> str:
    """A report section embedding those of the PNGs ``names`` (relative to OUT) that exist."""
    present = [n for n in names if (Path(out_dir) / n).is_file()]
    if not present:
        return ""
    return "\n".join([f"## {heading}", "", *(f"![{Path(n).stem}]({n})\n" for n in present)])
