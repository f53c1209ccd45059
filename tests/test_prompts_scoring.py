import math

import pytest

from stackrlhf.data.scoring import answer_score
from stackrlhf.prompts import PROMPT_TEMPLATE, format_prompt


def test_prompt_template_is_the_documented_one():
    assert PROMPT_TEMPLATE == "Question: {title}\n\n{body}\n\nAnswer: "
    assert format_prompt("Why hops?", "Body text.") == "Question: Why hops?\n\nBody text.\n\nAnswer: "


def test_prompt_without_title_keeps_the_shape():
    assert format_prompt("", "Only a body") == "Question: Only a body\n\nAnswer: "


@pytest.mark.parametrize("upvotes,accepted,expected", [
    (0, False, 0), (1, False, 1), (2, False, 2), (3, False, 2), (6, False, 3), (7, False, 3),
    (15, False, 4), (100, False, 7), (0, True, 1), (7, True, 4),
    (-1, False, -1), (-5, True, -1),  # negative: -1 whatever else
])
def test_answer_score_rule(upvotes, accepted, expected):
    assert answer_score(upvotes, accepted) == expected


def test_answer_score_matches_formula_over_a_range():
    for s in range(0, 500):
        assert answer_score(s, False) == round(math.log2(1 + s))
        assert answer_score(s, True) == round(math.log2(1 + s)) + 1
