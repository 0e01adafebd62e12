"""Answer parsing and scoring, one parser per answer format of a subject.

A parser turns a generated text into the answer it states, or ``None`` when it states none. Parsers are small
named objects in the ``PARSERS`` registry, so a subject names its format as data (``"boxed"`` for Monet and Mirage,
``"letter"`` for LVR) and a new format is one decorated function:

- ``boxed``:  the content of the last ``\\boxed{...}`` (nested and escaped braces handled, ``\\text{}`` unwrapped).
- ``letter``: an option letter ("A", "(B)", "B.", "Answer: C", "The answer is D"), or an option's text mapped to
  its letter.
- ``tags``:   the content of the last ``<answer>...</answer>``.
- ``answer_tag_letter``: LVR's evaluation rule: the text after the last ``<answer>`` (up to ``</answer``), its
  first word's first character; with no tag, the first character of the whole output.
- ``exact``:  the whole text, compared after SQuAD-style normalisation.

``score_answer`` parses a text and compares it with the instance's gold answer. An instance may name its own
check in ``attributes["answer_check"]`` (``CHECKS``): VSP planning instances say ``"plan_on_map"`` and are scored
by simulating the stated plan on the map, as VSP's and Mirage's evaluations do, not by string equality. "unparsable" is a status of its
own, never counted as correct, so summaries can report it apart from "wrong". When the instance has options the
comparison goes both ways: a parsed letter or a parsed option text matches a gold given as a letter or as text.

>>> from latentprobe.data import Instance
>>> inst = Instance(id="q1", question="Colour?", answer="red", options=["blue", "red"])
>>> score_answer("So the answer is \\\\boxed{B}.", inst, "boxed").status
'correct'
>>> score_answer("I cannot tell.", inst, "letter").status
'unparsable'
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Callable

from ..data.instances import Instance
from ..errors import LatentProbeError

ANSWER_STATUSES = ("correct", "wrong", "unparsable")
# Parsers whose answers to an option question are letters: the answer slot's candidates are the option letters.
LETTER_PARSERS = frozenset({"letter", "boxed", "answer_tag_letter", "final_answer"})


@dataclass(frozen=True)
class ParsedAnswer:
    """What a generated text answered and how it scored.

    ``parsed`` is the answer as the text states it (``None`` when unparsable). ``canonical`` is the form to compare
    answers by across runs (flip rates): the option letter when the answer resolves to an option, else the
    normalised text. ``correct`` is derived from ``status``.
    """

    parsed: str | None
    status: str
    canonical: str | None = None
    correct: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.status not in ANSWER_STATUSES:
            raise ValueError(f"status must be one of {ANSWER_STATUSES}, got {self.status!r}")
        object.__setattr__(self, "correct", self.status == "correct")


@dataclass(frozen=True)
class AnswerParser:
    """A named answer format: ``extract(text, instance)`` returns the stated answer or ``None``."""

    name: str
    extract: Callable[[str, Instance], str | None]
    description: str


PARSERS: dict[str, AnswerParser] = {}


def register_parser(name: str, description: str):
    """Decorator adding ``extract(text, instance) -> str | None`` to ``PARSERS`` under ``name``.

    >>> @register_parser("first_word", "the first word of the text")
    ... def _first_word(text, instance):
    ...     return text.split()[0] if text.split() else None
    >>> get_parser("first_word").extract("blue sky", None)
    'blue'
    >>> _ = PARSERS.pop("first_word")
    """

    def add(extract: Callable[[str, Instance], str | None]) -> Callable[[str, Instance], str | None]:
        PARSERS[name] = AnswerParser(name=name, extract=extract, description=description)
        return extract

    return add


def get_parser(name: str | AnswerParser) -> AnswerParser:
    """Look a parser up by name (an ``AnswerParser`` passes through)."""
    if isinstance(name, AnswerParser):
        return name
    if name not in PARSERS:
        raise LatentProbeError(f"unknown answer parser {name!r}",
                               f"use one of {', '.join(sorted(PARSERS))} or register one with register_parser")
    return PARSERS[name]


# --------------------------------------------------------------------------------------------- normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace.

    >>> normalize_answer("  The Red  square. ")
    'red square'
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def texts_match(first: str, second: str) -> bool:
    """Equal after normalisation, or equal as numbers ("3" and "3.0")."""
    first_norm, second_norm = normalize_answer(first), normalize_answer(second)
    if not first_norm and not second_norm:
        # Both vanish under normalisation (e.g. "A" and "the"): the articles rule must not make them equal.
        return first.strip().lower() == second.strip().lower()
    if first_norm == second_norm:
        return True
    first_number, second_number = _as_number(first), _as_number(second)
    return first_number is not None and first_number == second_number


def _as_number(text: str) -> float | None:
    try:
        return float(text.strip().strip("$").replace(",", ""))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------- options

# A letter standing alone or clearly marked as a label: "B", "(B)", "B.", "B)", "B: red", "(B) red".
# "A cat" is not a letter: without a mark the "A" is read as an article.
_MARKED_LETTER = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])(?=[.:)]|\s*$))")
# After "the answer is", an uppercase letter followed by any non-word character is a letter: "B because ...".
_EXPLICIT_LETTER = re.compile(r"^\s*\(?([A-Z])\)?(?!\w)")


def _letters(instance: Instance | None) -> list[str]:
    if instance is not None and instance.options:
        return instance.option_letters
    return list(string.ascii_uppercase)  # no options: any letter may be the gold


def option_letter(answer: str, instance: Instance) -> str | None:
    """The option letter an answer (a letter or an option's text) refers to, else ``None``.

    >>> inst = Instance(id="q", question="?", answer="B", options=["cat", "dog"])
    >>> option_letter("(b)", inst), option_letter("The dog.", inst), option_letter("fish", inst)
    ('B', 'B', None)
    """
    if not instance.options:
        return None
    letter = _marked_letter(answer, instance)
    if letter is not None:
        return letter
    for letter, option in zip(instance.option_letters, instance.options):
        if texts_match(answer, option):
            return letter
    return None


def _marked_letter(text: str, instance: Instance | None, explicit: bool = False) -> str | None:
    match = _MARKED_LETTER.match(text) or (_EXPLICIT_LETTER.match(text) if explicit else None)
    if match is None:
        return None
    letter = next(group for group in match.groups() if group).upper()
    return letter if letter in _letters(instance) else None


@dataclass(frozen=True)
class AnswerCheck:
    """An instance-specific way to judge a parsed answer (named in ``instance.attributes["answer_check"]``).

    ``judge(parsed, instance)`` returns True/False, or None when the parsed text states no answer of this kind
    (unparsable); ``canonical(parsed, instance)`` is the form compared across runs (flip rates).
    """

    name: str
    judge: Callable[[str, Instance], bool | None]
    canonical: Callable[[str, Instance], str | None]


def _plan_check() -> AnswerCheck:
    from ..data.benchmarks.vsp import judge_plan, canonical_plan  # the maze rules live with the benchmark

    return AnswerCheck("plan_on_map", judge_plan, canonical_plan)


CHECKS: dict[str, Callable[[], AnswerCheck]] = {"plan_on_map": _plan_check}


def instance_check(instance: Instance) -> AnswerCheck | None:
    """The instance's own answer check, if it names one."""
    name = (instance.attributes or {}).get("answer_check")
    if not name:
        return None
    if name not in CHECKS:
        raise LatentProbeError(f"instance {instance.id} asks for answer check {name!r}, which latentprobe lacks",
                               f"use one of {', '.join(sorted(CHECKS))} or drop attributes['answer_check']")
    return CHECKS[name]()


def answers_match(parsed: str, instance: Instance) -> bool:
    """Whether a parsed answer is the instance's gold answer, comparing letters and option texts both ways."""
    check = instance_check(instance)
    if check is not None:
        return bool(check.judge(parsed, instance))
    if instance.options:
        parsed_letter, gold_letter = option_letter(parsed, instance), option_letter(instance.answer, instance)
        if parsed_letter is not None and gold_letter is not None:
            return parsed_letter == gold_letter
    return texts_match(parsed, instance.answer)


def canonical_answer(parsed: str, instance: Instance) -> str:
    """The option letter when ``parsed`` resolves to an option, else its normalised text (for flip rates)."""
    letter = option_letter(parsed, instance) if instance.options else None
    return letter if letter is not None else normalize_answer(parsed)


# ------------------------------------------------------------------------------------------------ parsers

@register_parser("boxed", "the content of the last \\boxed{...}")
def extract_boxed(text: str, instance: Instance | None = None) -> str | None:
    r"""The content of the last complete ``\boxed{...}``, with ``\text{}``-style wrappers removed.

    >>> extract_boxed(r"so \boxed{\frac{1}{2}} then \boxed{\text{red}}")
    'red'
    >>> extract_boxed(r"truncated \boxed{\frac{1}{2}") is None
    True
    """
    start = text.rfind("\\boxed")
    while start != -1:
        content = _braced_content(text, start + len("\\boxed"))
        if content is not None:
            content = _unwrap_latex_text(content).strip()
            return content or None
        # A truncated last box (generation cut off) does not hide an earlier complete one.
        start = text.rfind("\\boxed", 0, start)
    return None


def _braced_content(text: str, position: int) -> str | None:
    """The text inside the brace group opening at ``position`` (after spaces); ``None`` if absent or unclosed."""
    while position < len(text) and text[position].isspace():
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth, index = 0, position
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # an escaped brace (\{ in a LaTeX set) does not open or close a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1:index]
        index += 1
    return None


_LATEX_TEXT_WRAPPER = re.compile(r"^\s*\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{(.*)\}\s*$", re.S)


def _unwrap_latex_text(content: str) -> str:
    while (match := _LATEX_TEXT_WRAPPER.match(content)) and _braced_content(content, content.index("{")) == match[1]:
        content = match[1]
    return content.strip().strip("$").strip()


# "Answer: C", "the final answer is (D)", "**Answer:** B"; the rest of that line is the candidate.
_EXPLICIT_ANSWER = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.I)


@register_parser("letter", "an option letter, or an option's text mapped to its letter")
def extract_letter(text: str, instance: Instance | None = None) -> str | None:
    """The option letter a text states.

    An explicit "answer is X" / "Answer: X" wins (the last one); otherwise the whole text, then its first and last
    lines must be a marked letter ("B", "(B)", "B. red") or an option's text.

    >>> inst = Instance(id="q", question="?", answer="A", options=["cat", "dog", "owl", "fox"])
    >>> [extract_letter(t, inst) for t in ["(B)", "The answer is D because...", "owl", "Answer: dog", "hmm"]]
    ['B', 'D', 'C', 'B', None]
    """
    cleaned = text.replace("*", "")  # markdown bold around "Answer:" would hide the colon
    explicit = [(candidate, True) for candidate in reversed(_EXPLICIT_ANSWER.findall(cleaned))]
    lines = [line for line in cleaned.splitlines() if line.strip()]
    plain = [(candidate, False) for candidate in [cleaned.strip(), *lines[:1], *lines[-1:]]]
    for candidate, is_explicit in explicit + plain:
        letter = _marked_letter(candidate, instance, explicit=is_explicit)
        if letter is None and instance is not None and instance.options:
            letter = option_letter(candidate, instance)
        if letter is not None:
            return letter
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)


@register_parser("tags", "the content of the last <answer>...</answer>")
def extract_tags(text: str, instance: Instance | None = None) -> str | None:
    """The content of the last closed, non-empty ``<answer>`` tag; an unclosed tag (cut-off output) is unparsable.

    >>> extract_tags("<think>...</think><answer> 42 </answer>")
    '42'
    """
    contents = [content.strip() for content in _ANSWER_TAG.findall(text) if content.strip()]
    return contents[-1] if contents else None


@register_parser("answer_tag_letter", "LVR: first character of the first word inside the last <answer>")
def extract_answer_tag_letter(text: str, instance: Instance | None = None) -> str | None:
    """LVR's reading of an answer (VincentLeebang/lvr, evaluation/evaluation.py ``accuracy_reward``).

    The text after the last ``<answer>`` and before ``</answer``, stripped; its first word; that word's first
    character. With no ``<answer>`` the whole output is read the same way. The authors compare that character with
    the gold letter as is (case-sensitive); here a character that is not an option letter is unparsable, which
    scores the same (never correct) but is reported apart.

    >>> inst = Instance(id="q", question="?", answer="B", options=["cat", "dog"])
    >>> [extract_answer_tag_letter(t, inst) for t in ["\\n<answer> B </answer>", "<answer>B. dog</answer>", "A", "dog"]]
    ['B', 'B', 'A', None]
    """
    content = text.split("<answer>")[-1].split("</answer")[0].strip()
    if not content:
        return None
    character = content.split()[0][0]
    return character if character in _letters(instance) else None


@register_parser("exact", "the whole text, compared after SQuAD normalisation")
def extract_exact(text: str, instance: Instance | None = None) -> str | None:
    """The whole text, stripped; empty output is unparsable.

    >>> extract_exact("  The red square.  ")
    'The red square.'
    """
    return text.strip() or None


_FINAL_ANSWER_PATTERNS = (re.compile(r"final\s*answer\s*(?:is)?\s*[:：]\s*(.+)", re.I),
                          re.compile(r"answer\s*(?:is)?\s*[:：]\s*(.+)", re.I))


@register_parser("final_answer", "ILVR: the first line after 'final answer:' (else 'answer:'), else the text")
def extract_final_answer(text: str, instance: Instance | None = None) -> str | None:
    r"""ILVR's reading of an answer (XD111ds/ILVR, src/evaluate_deepseed.py ``extract_final_answer``).

    The first line after the first "final answer:" (or "final answer is:"), else after the first "answer:", case
    ignored; else the single yes/no word of the text; else the whole text. Its ``normalize_for_match`` then
    compares yes/no words; here the parsed text is compared as every parser's is (options, then normalised text).

    >>> [extract_final_answer(t) for t in ["Final answer: B\nmore", "so the answer is: no", "Yes.", "red"]]
    ['B', 'no', 'yes', 'red']
    """
    stripped = text.strip()
    for pattern in _FINAL_ANSWER_PATTERNS:
        match = pattern.search(stripped)
        if match:
            return re.split(r"[\n\r]", match.group(1).strip())[0] or None
    words = [w for w in re.findall(r"[A-Za-z]+", stripped.lower()) if w in ("yes", "true", "a", "no", "false", "b")]
    if len(words) == 1:  # the authors' yes/no sets (they hold "a" and "b" too)
        return words[0]
    return stripped or None


@register_parser("after_hash", "Coconut: the text after the last '#', commas removed")
def extract_after_hash(text: str, instance: Instance | None = None) -> str | None:
    """Coconut's reading (facebookresearch/coconut, run.py): ``text.split("#")[-1].replace(",", "").strip()``.

    Coconut splits the decoded prompt and output together; the prompt holds no '#', so an output without one
    gives Coconut the whole text and gives this parser the output alone.

    >>> [extract_after_hash(t) for t in ["### 1,800", "Every wumpus ... ### Alex is a zumpus.", "###"]]
    ['1800', 'Alex is a zumpus.', None]
    """
    return text.split("#")[-1].replace(",", "").strip() or None


_NUMBER = re.compile(r"-?\d+\.?\d*")


@register_parser("last_number", "CODI: the last number in the text, commas removed")
def extract_last_number(text: str, instance: Instance | None = None) -> str | None:
    """CODI's reading (zhenyi4/codi, test.py ``extract_answer_number``): commas removed, the last number (an
    optional minus, digits, an optional point and digits). CODI turns it into a float; here its text is kept (a
    trailing "." dropped), which `texts_match` compares as a number.

    >>> [extract_last_number(t) for t in ["The answer is: 1,800", "3 apples, then 7.", "none"]]
    ['1800', '7', None]
    """
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1].rstrip(".") if numbers else None


# ------------------------------------------------------------------------------------------------ scoring

def score_answer(text: str | None, instance: Instance, parser: str | AnswerParser) -> ParsedAnswer:
    """Parse ``text`` with the named parser and score it against ``instance``'s gold answer.

    >>> inst = Instance(id="q", question="?", answer="B", options=["cat", "dog"])
    >>> score_answer("Answer: (A)", inst, "letter")
    ParsedAnswer(parsed='A', status='wrong', canonical='A', correct=False)
    >>> score_answer(r"\\boxed{dog}", inst, "boxed").correct
    True
    """
    extract = get_parser(parser).extract
    parsed = extract(text, instance) if text else None
    if parsed is None or not parsed.strip():
        return ParsedAnswer(parsed=None, status="unparsable")
    check = instance_check(instance)
    if check is not None:
        verdict = check.judge(parsed, instance)
        if verdict is None:  # e.g. a box holding no move at all
            return ParsedAnswer(parsed=None, status="unparsable")
        return ParsedAnswer(parsed=parsed, status="correct" if verdict else "wrong",
                            canonical=check.canonical(parsed, instance))
    status = "correct" if answers_match(parsed, instance) else "wrong"
    return ParsedAnswer(parsed=parsed, status=status, canonical=canonical_answer(parsed, instance))
