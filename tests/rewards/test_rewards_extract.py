"""The linear-time tag parsing returns exactly what the reference regexes return."""
from __future__ import annotations

import random
import time

import pytest

from grail_megatron.rewards.extract import (
    REFERENCE_SOLUTION_PATTERN,
    REFERENCE_THINKING_PATTERN,
    find_solution,
    has_thinking,
    parse_completion,
)

# Tag variants, near-misses, ASCII and Unicode whitespace (\s in re == str.isspace), and
# characters with special IGNORECASE folding (long s, Kelvin sign).
_TOKENS = [
    "<SOLUTION>", "</SOLUTION>", "<solution>", "</Solution>", "<SOLUTION >", "</SOLUTION",
    "<start_working_out>", "</end_working_out>", "<START_WORKING_OUT>", "</END_working_out>",
    " ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u2003", "\x1c",
    "a", "1", "x", "<", "/", ">", "S", "\u017f", "\u212a", "#",
]


def _random_strings(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, 16)))


def test_solution_search_equals_reference_regex_on_random_strings():
    matched = 0
    for text in _random_strings(seed=1234, count=40_000):
        expected = REFERENCE_SOLUTION_PATTERN.search(text)
        got = find_solution(text)
        if expected is None:
            assert got is None, repr(text)
            continue
        matched += 1
        assert got is not None, repr(text)
        assert (got.group_start, got.group_end, got.end) == (expected.start(1), expected.end(1), expected.end()), repr(text)
        assert got.group(text) == expected.group(1)
    assert matched > 2_000  # the generator exercises the matching paths, not only misses


def test_thinking_detection_equals_reference_regex_on_random_strings():
    for text in _random_strings(seed=99, count=40_000):
        assert has_thinking(text) == bool(REFERENCE_THINKING_PATTERN.search(text)), repr(text)


@pytest.mark.parametrize(
    "text, inside, trailing",
    [
        ("<SOLUTION>   </SOLUTION>", "", 0),  # group is the last space, stripped
        ("<SOLUTION>\t18\r\n</SOLUTION>", "18", 0),
        ("<solution> -7 </solution>xyz", "-7", 3),
        ("<SOLUTION>18</SOLUTION><SOLUTION>20</SOLUTION>", "18", 23),
        ("<SOLUTION></SOLUTION>5</SOLUTION>", "</SOLUTION>5", 0),  # lazy group needs 1 char
    ],
)
def test_parse_completion_examples(text, inside, trailing):
    parsed = parse_completion(text)
    assert (parsed.has_solution, parsed.inside, parsed.trailing) == (True, inside, trailing)


@pytest.mark.parametrize(
    "text",
    [
        "<SOLUTION>" + " " * 100_000,  # the reference's cubic case (5k spaces: > 30 s)
        "<SOLUTION>" + " \n" * 50_000 + "x",
        "<start_working_out>" * 5_000 + "x" * 50_000,  # quadratic for the thinking regex
        ("<SOLUTION>" + " " * 20) * 4_000,
    ],
    ids=["unclosed-spaces", "unclosed-mixed-ws", "many-open-thinking", "repeated-unclosed"],
)
def test_pathological_inputs_parse_fast(text):
    start = time.perf_counter()
    parsed = parse_completion(text)
    assert time.perf_counter() - start < 0.25  # the reference needs seconds to minutes here
    assert parsed.has_solution is False and parsed.thinking is False
