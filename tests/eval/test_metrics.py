"""Answer extraction, scoring and the statistics of `tuneforge eval`."""

import math

import pytest

from tuneforge.errors import UserError
from tuneforge.eval.metrics import Scorer, extract_gsm8k, parse_number
from tuneforge.eval.stats import exact_binomial_p, wilson_interval


@pytest.mark.parametrize("text, answer", [
    ("She sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,234", "1,234"),
    ("#### -5.50 dollars", "-5.50"),
    ("The total is 12 apples, then 7 more, so 19.", "19"),  # no ####: the last number
    ("costs $1,000.", "$1,000"),
    ("no number here", None),
    ("#### 3 but later 4", "3"),  # #### wins over the last number
])
def test_extract_gsm8k(text, answer):
    assert extract_gsm8k(text) == answer


def test_parse_number():
    assert parse_number("1,234") == parse_number("1234.0") == parse_number("$1234")
    assert parse_number("72.") == 72
    assert parse_number("abc") is None and parse_number(None) is None


@pytest.mark.parametrize("generation, correct", [
    ("so the answer is 1,000.00", True),
    ("#### 1000", True),
    ("#### 999", False),
    ("1000 cookies, minus 1", False),  # the last number is 1
    ("nothing", False),
])
def test_gsm8k_scoring_is_numeric(generation, correct):
    assert Scorer("gsm8k").score(generation, "steps...\n#### 1,000")[2] is correct


def test_exact_contains_regex():
    assert Scorer("exact").score("  Paris. ", "paris")[2]
    assert not Scorer("exact").score("Paris, France", "paris")[2]
    assert Scorer("contains").score("It is Paris, France.", "paris")[2]
    assert not Scorer("contains").score("London", "paris")[2]
    regex = Scorer("regex", r"answer: (\w+)")
    assert regex.score("the answer: B", "B") == ("B", "B", True)
    assert regex.score("the answer: C", "answer: b") == ("C", "b", False)
    assert regex.score("no match", "B") == (None, "B", False)
    for bad in (None, "(a)(b)", "no group", "(unclosed"):
        with pytest.raises(UserError):
            Scorer("regex", bad)


def test_wilson_interval_reference_values():
    low, high = wilson_interval(8, 10)  # textbook value: 0.490 - 0.943
    assert math.isclose(low, 0.4902, abs_tol=1e-4) and math.isclose(high, 0.9433, abs_tol=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and 0 < wilson_interval(0, 20)[1] < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_exact_binomial_p():
    assert exact_binomial_p(0, 0) == 1.0
    assert math.isclose(exact_binomial_p(0, 5), 2 / 32)  # two-sided: both all-one-way outcomes
    assert math.isclose(exact_binomial_p(1, 9), 2 * 11 / 1024)
    assert exact_binomial_p(5, 5) == 1.0
    assert exact_binomial_p(2, 8) == exact_binomial_p(8, 2)
