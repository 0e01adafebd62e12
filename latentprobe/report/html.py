"""Render report blocks (`latentprobe.report.blocks`) as Markdown and as one self-contained HTML page.

The HTML embeds every figure as a data URI (a 256-colour PNG, or the figure's SVG where that is smaller) and
its CSS inline, so it makes no request when opened; it has a print layout (no navigation, no figure split
over pages). The first screen is the verdict matrix with its legend.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from ..stats.parallel import map_in_threads
from .blocks import (Bullets, Contents, Figure, Heading, Legend, Paragraph, Table, VerdictLine, VerdictMatrix)


def verdict_class(verdict: str) -> str:
    return "verdict verdict-" + str(verdict).replace(" ", "-")


# ------------------------------------------------------------------------------------------- Markdown


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _markdown_table(columns, rows) -> list[str]:
    header = [_markdown_cell(c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(blocks: list, out_dir: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [(f"**{block.label}:** " if block.label else "") + block.text, ""]
        elif isinstance(block, VerdictLine):
            lines += [f"- **{block.subject}: {block.verdict}.** {block.evidence}", ""]
        elif isinstance(block, Bullets):
            lines += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Contents):
            lines += ["Contents: " + " · ".join(f"[{text}](#{anchor})" for anchor, text in block.entries), ""]
        elif isinstance(block, Legend):
            lines += ["Legend: " + "; ".join(f"*{word}*: {meaning}" for _, word, meaning in block.entries), ""]
        elif isinstance(block, VerdictMatrix):
            rows = [[subject] + [block.cells.get((subject, f), ("", ""))[0] for f in block.findings]
                    for subject in block.subjects]
            lines += _markdown_table(["subject"] + [block.questions[f] for f in block.findings], rows)
            for subject in block.subjects:
                for finding in block.findings:
                    verdict, evidence = block.cells.get((subject, finding), ("", ""))
                    lines.append(f"- **{subject}**, {block.questions[finding]} **{verdict}**"
                                 + (f": {evidence}" if evidence else ""))
            lines.append("")
        elif isinstance(block, Table):
            if block.caption:
                lines += [f"*{block.caption}*", ""]
            lines += _markdown_table(block.frame.columns, block.frame.itertuples(index=False))
        elif isinstance(block, Figure):
            if Path(block.path).exists():
                relative = Path(os.path.relpath(Path(block.path).resolve(), out_dir.resolve())).as_posix()
                lines += [f"![{block.caption}]({relative})", "", f"*{block.caption}*", ""]
            else:
                lines += [f"*figure missing: {Path(block.path).name}*", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ HTML

CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1320px; margin: 0 auto;
       padding: .6em 1.2em 2em; color: #1a1a1a; line-height: 1.4; font-size: 15px; }
h1 { font-size: 1.45em; margin: .3em 0 .2em; } .question { font-size: 1.05em; margin: .2em 0 .5em; color: #333; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; font-size: 1.25em; }
h3 { font-size: 1.05em; margin-top: 1.3em; } h1, h2, h3 { line-height: 1.2; }
table { border-collapse: collapse; margin: .5em 0 1.1em; font-size: .86em; }
th, td { border: 1px solid #bbb; padding: .22em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } caption { caption-side: top; text-align: left; font-style: italic; padding: .3em 0; }
figure { margin: .8em 0 1.4em; } figure img { max-width: 100%; max-height: 85vh; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .88em; color: #333; max-width: 60em; }
.verdict { font-weight: 600; padding: .05em .45em; border-radius: .3em; white-space: nowrap; }
.verdict-disconnect, .verdict-collapsed, .verdict-limited { background: #cfe3f5; }
.verdict-connected, .verdict-not-collapsed, .verdict-informative { background: #f8d9b5; }
.verdict-inconclusive { background: #e6e6e6; } .verdict-not-measured { background: #fff; border: 1px dashed #999; }
table.matrix { width: 100%; table-layout: fixed; font-size: .8em; margin: .3em 0 .4em; }
table.matrix th { font-size: 1.08em; } table.matrix th a { color: inherit; text-decoration: none; }
table.matrix th.subject, table.matrix td.subject { width: 13em; white-space: nowrap; }
table.matrix td { padding: .3em .45em; overflow-wrap: anywhere; } table.matrix .evidence { display: block; color: #333; margin-top: .15em;
       line-height: 1.25; }
.legend { font-size: .82em; margin: .2em 0 .3em; } .legend span.item { margin-right: 1.2em; display: inline-block; }
nav.contents { font-size: .85em; margin: .3em 0; } nav.contents a { margin-right: .9em; }
ul.verdicts li { margin-bottom: .25em; }
@media print {
  body { max-width: none; font-size: 10.5pt; padding: 0; } nav.contents { display: none; }
  figure, table, ul.verdicts li { break-inside: avoid; } h2, h3 { break-after: avoid; }
  h2 { break-before: page; } h2.first { break-before: auto; } a { color: inherit; text-decoration: none; }
}
"""

_MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def compressed_png(path: Path) -> bytes:
    """The PNG re-encoded with a 256-colour palette (figures use few colours; 3-5x smaller, no visible change)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    return data if data and len(data) < path.stat().st_size else path.read_bytes()


def figure_data_uri(path: Path) -> str | None:
    """A data URI for a figure: its compressed PNG, or its SVG twin when that is smaller; None when missing."""
    path = Path(path)
    png, svg = path.with_suffix(".png"), path.with_suffix(".svg")
    candidates = []
    if png.exists():
        candidates.append(("image/png", compressed_png(png)))
    if svg.exists():
        candidates.append(("image/svg+xml", svg.read_bytes()))
    if not candidates and path.exists() and path.suffix.lower() in _MIME:
        candidates.append((_MIME[path.suffix.lower()], path.read_bytes()))
    if not candidates:
        return None
    mime, data = min(candidates, key=lambda c: len(c[1]))
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _cell(value, verdict_words) -> str:
    text = html.escape(str(value))
    if str(value) in verdict_words:
        return f'<span class="{verdict_class(str(value))}">{text}</span>'
    return text


def _matrix_html(block: VerdictMatrix) -> str:
    escape = html.escape
    header = '<th class="subject">subject</th>' + "".join(
        f'<th><a href="#{escape(f)}">{escape(block.questions[f])}</a></th>' for f in block.findings)
    body = []
    for subject in block.subjects:
        cells = [f'<td class="subject"><strong>{escape(subject)}</strong></td>']
        for finding in block.findings:
            verdict, evidence = block.cells.get((subject, finding), ("", ""))
            cells.append(f'<td><span class="{verdict_class(verdict)}">{escape(verdict)}</span>'
                         f'<span class="evidence">{escape(evidence)}</span></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="matrix" id="verdict-matrix"><thead><tr>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def render_html(blocks: list, title: str, verdict_words=()) -> str:
    escape = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"]
    in_verdicts = False
    first_h2 = True
    # Re-encoding the PNGs is most of the HTML's time; PIL releases the GIL, so they are encoded side by side.
    figure_paths = list(dict.fromkeys(Path(block.path) for block in blocks if isinstance(block, Figure)))
    uris = dict(zip(figure_paths, map_in_threads(figure_data_uri, figure_paths)))
    for block in blocks:
        if isinstance(block, VerdictLine) != in_verdicts:
            parts.append('<ul class="verdicts">' if not in_verdicts else "</ul>")
            in_verdicts = not in_verdicts
        if isinstance(block, Heading):
            anchor = f' id="{escape(block.anchor)}"' if block.anchor else ""
            first = ' class="first"' if block.level == 2 and first_h2 else ""
            first_h2 = first_h2 and block.level != 2
            parts.append(f"<h{block.level}{anchor}{first}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            if block.label == "Question":
                parts.append(f'<p class="question">{escape(block.text)}</p>')
                continue
            label = f"<strong>{escape(block.label)}:</strong> " if block.label else ""
            parts.append(f"<p>{label}{escape(block.text)}</p>")
        elif isinstance(block, VerdictLine):
            parts.append(f'<li><strong>{escape(block.subject)}</strong>: <span class="{verdict_class(block.verdict)}">'
                         f"{escape(block.verdict)}</span> &mdash; {escape(block.evidence)}</li>")
        elif isinstance(block, Bullets):
            parts.append("<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Contents):
            links = "".join(f'<a href="#{escape(anchor)}">{escape(text)}</a>' for anchor, text in block.entries)
            parts.append(f'<nav class="contents"><strong>Contents:</strong> {links}</nav>')
        elif isinstance(block, Legend):
            items = "".join(f'<span class="item"><span class="verdict {escape(css)}">{escape(word)}</span> '
                            f"{escape(meaning)}</span>" for css, word, meaning in block.entries)
            parts.append(f'<div class="legend">{items}</div>')
        elif isinstance(block, VerdictMatrix):
            parts.append(_matrix_html(block))
        elif isinstance(block, Table):
            caption = f"<caption>{escape(block.caption)}</caption>" if block.caption else ""
            header = "".join(f"<th>{escape(str(c))}</th>" for c in block.frame.columns)
            body = "".join("<tr>" + "".join(f"<td>{_cell(v, verdict_words)}</td>" for v in row) + "</tr>"
                           for row in block.frame.itertuples(index=False))
            parts.append(f"<table>{caption}<thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Figure):
            uri = uris[Path(block.path)]
            if uri is None:
                parts.append(f"<p><em>figure missing: {escape(Path(block.path).name)}</em></p>")
            else:
                parts.append(f'<figure><img src="{uri}" alt="{escape(block.caption)}">'
                             f"<figcaption>{escape(block.caption)}</figcaption></figure>")
    if in_verdicts:
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
