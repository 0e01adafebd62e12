"""The pieces a report is made of: headings, paragraphs, tables, figures, verdict lines and the verdict matrix.

A report is built once as a list of these blocks and rendered twice (Markdown and HTML, `latentprobe.report.html`),
so both always say the same thing. Sections drawn from other run kinds (patching, grounding, lens) return
blocks too, and the report places them where they belong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""  # the id a table of contents links to ("" for none)


@dataclass
class Paragraph:
    text: str
    label: str = ""  # a bold lead-in such as "Rule"


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str  # a sentence: what is drawn and how to read it, not the file name


@dataclass
class VerdictLine:
    subject: str
    verdict: str
    evidence: str


@dataclass
class VerdictMatrix:
    """Subjects (rows) x findings (columns): each cell the verdict word and its deciding evidence in words."""

    subjects: list[str]
    findings: list[str]
    questions: dict[str, str]  # finding -> the plain question heading its column
    cells: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (subject, finding) -> (verdict, evidence)


@dataclass
class Legend:
    """What the colours of the verdict words mean."""

    entries: list[tuple[str, str, str]]  # (css class, sample word, meaning)


@dataclass
class Contents:
    entries: list[tuple[str, str]]  # (anchor, text)


def anchor_of(text: str) -> str:
    """A stable HTML id for a heading text."""
    slug = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(part for part in slug.split("-") if part)[:60]
