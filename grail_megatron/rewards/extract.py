"""Tag parsing shared by the three GRAIL rewards, in linear time.

The reference (GRAIL research/verl/reward_functions.py) uses two regexes:

* thinking: ``<start_working_out>.*?</end_working_out>`` (DOTALL | IGNORECASE)
* solution: ``<SOLUTION>\\s*(.+?)\\s*</SOLUTION>`` (DOTALL | IGNORECASE)

Python's backtracking engine runs the solution regex in cubic time when an opening tag is
followed by a long whitespace run and never closed (2k spaces: 4.6 s), and the thinking
regex in quadratic time on many unclosed opening tags. The functions below return exactly
what ``re.search`` returns wherever it finishes (property-tested against it) in linear
time: literal-tag searches for the solution, and for thinking one match whose atomic group
commits to the first opening tag (the only one that matters).

Why the solution search needs no loop over opening tags: for the first opening tag ending
at ``q`` with its whitespace run ending at ``w``, the regex can only succeed with a closing
tag starting at ``c >= w + 1`` (group starts at ``w``), or at ``c == w`` when ``w > q``
(the group is then the last whitespace character). If neither exists, no later opening tag
(all start at or after ``w``) can find a closing tag either, so the whole search fails.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from grail_megatron.prompts import REASONING_END, REASONING_START, SOLUTION_END, SOLUTION_START

_FLAGS = re.IGNORECASE | re.DOTALL
# The atomic group commits to the first opening tag, so a missing closing tag is found
# missing with one scan instead of one scan per opening tag (the reference's quadratic case).
_THINKING = re.compile(rf"(?>.*?{re.escape(REASONING_START)}).*?{re.escape(REASONING_END)}", _FLAGS)
# The opening tag and the whitespace run after it in one (linear) match.
_SOL_OPEN_WS = re.compile(re.escape(SOLUTION_START) + r"\s*", _FLAGS)
_SOL_CLOSE = re.compile(re.escape(SOLUTION_END), _FLAGS)

# The reference patterns, kept for the equivalence tests and documentation only.
REFERENCE_THINKING_PATTERN = re.compile(
    rf"{re.escape(REASONING_START)}.*?{re.escape(REASONING_END)}", _FLAGS
)
REFERENCE_SOLUTION_PATTERN = re.compile(
    rf"{re.escape(SOLUTION_START)}\s*(.+?)\s*{re.escape(SOLUTION_END)}", _FLAGS
)


@dataclass(frozen=True, slots=True)
class SolutionMatch:
    """What the reference's ``re.search`` match exposes: group(1) span and match end."""

    group_start: int
    group_end: int
    end: int

    def group(self, text: str) -> str:
        return text[self.group_start : self.group_end]


def has_thinking(text: str) -> bool:
    """True iff the reference thinking regex matches: an open tag, later a close tag."""
    return _THINKING.match(text) is not None


def find_solution(text: str) -> SolutionMatch | None:
    """Linear-time equivalent of ``REFERENCE_SOLUTION_PATTERN.search(text)``."""
    span = _solution_span(text)
    return None if span is None else SolutionMatch(*span)


def _solution_span(text: str) -> tuple[int, int, int] | None:
    """(group start, group end, match end) of the reference's first match, or None."""
    opened = _SOL_OPEN_WS.search(text)
    if opened is None:
        return None
    group_start = opened.end()
    closed = _SOL_CLOSE.search(text, group_start + 1)
    if closed is not None:
        # The lazy group stops at the first position whose whitespace run reaches the tag,
        # but it holds at least one character.
        group_end = closed.start()
        while group_end > group_start + 1 and text[group_end - 1].isspace():
            group_end -= 1
        return group_start, group_end, closed.end()
    if group_start > opened.start() + len(SOLUTION_START):
        closed = _SOL_CLOSE.match(text, group_start)
        if closed is not None:
            # "<SOLUTION>   </SOLUTION>": the group is the last whitespace character.
            return group_start - 1, group_start, closed.end()
    return None


class ParsedCompletion(NamedTuple):
    """The format facts every family reads from a completion."""

    thinking: bool
    has_solution: bool
    inside: str  # group(1).strip() of the solution match, "" without a match
    trailing: int  # characters after the closing tag, 0 without a match


def parse_completion(text: str) -> ParsedCompletion:
    span = _solution_span(text)
    if span is None:
        return ParsedCompletion(has_thinking(text), False, "", 0)
    return ParsedCompletion(has_thinking(text), True, text[span[0] : span[1]].strip(), len(text) - span[2])
