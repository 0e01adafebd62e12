"""Answer parsers on realistic model outputs, and scoring against letter or option-text gold answers."""

import pytest

from latentprobe.model.answers import (PARSERS, ParsedAnswer, extract_boxed, extract_letter, extract_tags,
                                 normalize_answer, score_answer)
from latentprobe.data import Instance
from latentprobe.errors import LatentProbeError

ANIMALS = ["cat", "dog", "owl", "fox"]


def animal_question(answer: str) -> Instance:
    return Instance(id="q1", question="Which animal is on the sofa?", answer=answer, options=ANIMALS)


def open_question(answer: str) -> Instance:
    return Instance(id="q2", question="What is written on the sign?", answer=answer)


# ------------------------------------------------------------------------------------------------ boxed

@pytest.mark.parametrize("text, expected", [
    (r"The ratio is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"First guess \boxed{3}, but recounting gives \boxed{4}.", "4"),
    (r"\boxed{\text{red}}", "red"),
    (r"\boxed{ \textbf{Eiffel Tower} }", "Eiffel Tower"),
    (r"The set is \boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed {B}", "B"),
    (r"so \boxed{\sqrt{\frac{a}{b}}} and then \boxed{\frac{1}{2", r"\sqrt{\frac{a}{b}}"),  # cut-off last box
])
def test_boxed_takes_last_complete_box_with_nested_braces(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", ["The answer is red.", r"\boxed{}", r"\boxed{\frac{1}{2}", "boxed{red}", ""])
def test_boxed_without_a_complete_box_is_unparsable(text):
    assert score_answer(text, open_question("red"), "boxed").status == "unparsable"


def test_monet_style_output_scores_against_option_text_gold():
    text = ("<abs_vis_token><abs_vis_token_pad></abs_vis_token> Looking at the sofa, there is a small animal "
            "with pointed ears and a bushy tail. The answer is \\boxed{D}.")
    result = score_answer(text, animal_question("fox"), "boxed")
    assert (result.parsed, result.status, result.correct) == ("D", "correct", True)


def test_boxed_option_text_matches_letter_gold():
    assert score_answer(r"\boxed{The owl}", animal_question("C"), "boxed").correct
    assert score_answer(r"\boxed{(B) dog}", animal_question("dog"), "boxed").correct
    assert score_answer(r"\boxed{owl}", animal_question("B"), "boxed").status == "wrong"


# ----------------------------------------------------------------------------------------------- letter

@pytest.mark.parametrize("text, expected", [
    ("A", "A"),
    ("(B)", "B"),
    ("B.", "B"),
    ("C)", "C"),
    ("b", "B"),
    ("Answer: C", "C"),
    ("**Answer:** (C)", "C"),
    ("The answer is D", "D"),
    ("The correct answer is (B) because the animal barks.", "B"),
    ("Looking closely at the image.\nThe final answer is A.", "A"),
    ("B. dog", "B"),
    ("B\nThe animal has floppy ears.", "B"),
    ("owl", "C"),
    ("The dog.", "B"),
    ("Answer: fox", "D"),
])
def test_letter_parser_reads_common_answer_styles(text, expected):
    assert extract_letter(text, animal_question("A")) == expected


@pytest.mark.parametrize("text", [
    "I cannot determine the animal from this image.",
    "A cat and a dog are both visible.",   # "A" here is an article, not an option letter
    "E",                                    # only four options
    "The answer is unclear.",
    "",
])
def test_letter_parser_refuses_unparsable_outputs(text):
    result = score_answer(text, animal_question("A"), "letter")
    assert result.status == "unparsable" and result.parsed is None and not result.correct


def test_letter_is_compared_with_gold_given_as_text_or_letter():
    assert score_answer("(B)", animal_question("dog"), "letter").status == "correct"
    assert score_answer("(B)", animal_question("B"), "letter").status == "correct"
    assert score_answer("(B)", animal_question("b"), "letter").status == "correct"
    assert score_answer("Answer: A", animal_question("dog"), "letter").status == "wrong"


def test_canonical_answer_is_the_letter_for_option_answers():
    by_letter = score_answer("B", animal_question("dog"), "letter")
    by_text = score_answer(r"\boxed{dog}", animal_question("dog"), "boxed")
    assert by_letter.canonical == by_text.canonical == "B"
    assert score_answer("Stop here", open_question("stop here"), "exact").canonical == "stop here"


# ------------------------------------------------------------------------------------------ tags, exact

def test_tags_parser_takes_last_closed_tag():
    text = "<think>maybe <answer>draft</answer></think> <ANSWER> Stop </ANSWER>"
    assert extract_tags(text) == "Stop"
    assert score_answer(text, open_question("stop"), "tags").correct
    assert score_answer("<answer>stop", open_question("stop"), "tags").status == "unparsable"
    assert score_answer("<answer>  </answer>", open_question("stop"), "tags").status == "unparsable"


@pytest.mark.parametrize("text, gold, status", [
    ("The Eiffel Tower.", "eiffel tower", "correct"),
    ("  an apple ", "Apple", "correct"),
    ("3.0", "3", "correct"),
    ("1,000", "1000", "correct"),
    ("Paris, France", "Paris", "wrong"),
    ("the", "A", "wrong"),       # both vanish under article removal: must not count as equal
    ("   ", "A", "unparsable"),
])
def test_exact_parser_uses_squad_normalisation(text, gold, status):
    assert score_answer(text, open_question(gold), "exact").status == status


def test_normalize_answer_matches_squad():
    assert normalize_answer("The  QUICK, brown fox!") == "quick brown fox"


# ------------------------------------------------------------------------------------------ the contract

def test_registry_and_errors():
    assert {"boxed", "letter", "tags", "exact"} <= set(PARSERS)
    with pytest.raises(LatentProbeError, match="unknown answer parser"):
        score_answer("A", animal_question("A"), "json")
    assert score_answer(None, animal_question("A"), "letter").status == "unparsable"


def test_parsed_answer_correct_follows_status():
    assert ParsedAnswer(parsed="A", status="correct", canonical="A").correct
    assert not ParsedAnswer(parsed=None, status="unparsable").correct
    with pytest.raises(ValueError):
        ParsedAnswer(parsed="A", status="maybe")


# ------------------------------------------------------------------------------------- LVR's <answer> rule

@pytest.mark.parametrize("text, expected", [
    ("\n<answer> B </answer>", "B"),
    ("<answer>B</answer>", "B"),
    ("<answer> C. owl </answer>", "C"),          # first word, first character
    ("<answer>Dog</answer>", "D"),                # the authors' rule reads "D" here: kept as they score it
    ("<answer> A </answer> then <answer> D </answer>", "D"),  # the last tag
    ("<answer> B", "B"),                          # unclosed: everything after the tag
    ("B", "B"),                                   # no tag: the first character of the output
    ("<answer> (B) </answer>", None),             # "(" is no option letter: unparsable (the authors: wrong)
    ("<answer> b </answer>", None),               # the authors compare case-sensitively
    ("The answer is B", None),                    # no tag: "T" is no option letter
    ("<answer>  </answer>", None),
])
def test_lvr_answer_tag_letter_follows_the_authors_evaluation(text, expected):
    from latentprobe.model.answers import extract_answer_tag_letter

    assert extract_answer_tag_letter(text, animal_question("B")) == expected


def test_lvr_output_scores_as_its_gold_letter():
    result = score_answer("\n<answer> B </answer>", animal_question("dog"), "answer_tag_letter")
    assert (result.status, result.canonical) == ("correct", "B")
    # the plain letter parser cannot read it: what made nearly every LVR row wrong before
    assert score_answer("\n<answer> B </answer>", animal_question("dog"), "letter").status == "unparsable"
