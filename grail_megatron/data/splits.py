"""GRAIL's deterministic train / validation splits (DESIGN.md section 6), on row indices only."""

from __future__ import annotations

import random
from collections.abc import Sequence

SPLIT_SEED = 42

# EleutherAI/hendrycks_math configs, in the order GRAIL draws from one Random(42).
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
MATH_VAL_SIZE = 500
MATH_REAL_TRAIN_SIZE = 7500

# GRAIL's newer MBPP scheme moves this share of the shuffled original test set to train.
MBPP_TEST_TO_TRAIN_FRACTION = 0.8


def default_math_val_size(total_train: int) -> int:
    """500 on the real 7,500 training problems; the same 1/15 share of a smaller source."""
    if total_train == MATH_REAL_TRAIN_SIZE:
        return MATH_VAL_SIZE
    return max(1, round(MATH_VAL_SIZE * total_train / MATH_REAL_TRAIN_SIZE)) if total_train > 1 else 0


def math_val_counts(subject_sizes: Sequence[int], val_size: int) -> list[int]:
    """Validation items per subject: round(val_size * share), the last subject the remainder.

    The share is computed as GRAIL does (`val_size * (n / total)`) so ties round the same way.
    """
    total = sum(subject_sizes)
    if val_size > total:
        raise ValueError(f"validation size {val_size} exceeds the {total} training problems")
    counts, remaining = [], val_size
    for position, n in enumerate(subject_sizes):
        if position == len(subject_sizes) - 1:
            k = remaining
            if k > n:
                raise ValueError(f"the last subject has {n} problems, fewer than the remaining {k} validation items")
        else:
            k = min(int(round(val_size * (n / total))), n, remaining)
        counts.append(k)
        remaining -= k
    return counts


def math_val_indices(subject_sizes: Sequence[int], val_size: int, seed: int = SPLIT_SEED) -> list[set[int]]:
    """Per subject, the indices (into that subject's train split) that go to validation.

    One `random.Random(seed)` shuffles each subject's index list in turn, in subject order;
    the first `count` shuffled indices are validation. Everything else stays in train, in
    the original order.
    """
    rng = random.Random(seed)
    chosen = []
    for n, k in zip(subject_sizes, math_val_counts(subject_sizes, val_size), strict=True):
        order = list(range(n))
        rng.shuffle(order)
        chosen.append(set(order[:k]))
    return chosen


def mbpp_redistribution(n_test: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """GRAIL's newer MBPP scheme: shuffled test indices (to train, to validation).

    Random(seed) shuffles the test indices; the first int(0.8 * n) join train (after the
    original train rows, in shuffled order), the rest join validation: 374 + 400 / 90 + 100.
    """
    order = list(range(n_test))
    random.Random(seed).shuffle(order)
    n_train = int(n_test * MBPP_TEST_TO_TRAIN_FRACTION)
    return order[:n_train], order[n_train:]
