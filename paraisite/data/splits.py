"""The paper's "9-fold" evaluation: nine random 80/20 hold-out splits.

Split k (k = 1..9) is drawn with its own seed k, as upstream does:

    perm = numpy.random.RandomState(k).permutation(n)
    train = perm[: int(0.8 * n)],  validation = perm[int(0.8 * n):]

This is repeated hold-out, not k-fold cross-validation: validation sets of
different splits overlap. A dataset made of several sources (MIX) is split
per source with the same seed and the parts concatenated.

Not in the paper: :func:`holdout_parts` also sets aside a share h of each
training part (drawn with seed 1000 + k) to choose the epoch on, so that the
validation part is never used to select anything:

    fit = train[perm'[: n_t - round(h n_t)]],  select = train[perm'[n_t - round(h n_t):]]
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NUM_SPLITS = 9
TRAIN_FRACTION = 0.8


def split_indices(n: int, seed: int, train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of one split of ``n`` items."""
    if n < 2:
        raise ValueError(f"cannot split {n} item(s) into training and validation parts")
    perm = np.random.RandomState(seed).permutation(n)
    cut = int(train_fraction * n)
    return perm[:cut], perm[cut:]


def split_parts(sizes: Sequence[int], seed: int, train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Split each part (of the given sizes, laid end to end) with the same seed; concatenate."""
    train, val, offset = [], [], 0
    for n in sizes:
        t, v = split_indices(n, seed, train_fraction)
        train.append(t + offset)
        val.append(v + offset)
        offset += n
    return np.concatenate(train), np.concatenate(val)


def nine_splits(sizes: Sequence[int] | int, num_splits: int = NUM_SPLITS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits k = 1..num_splits (element k-1 holds split k)."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    return [split_parts(sizes, k) for k in range(1, num_splits + 1)]


def holdout_parts(sizes: Sequence[int], seed: int, holdout: float,
                  train_fraction: float = TRAIN_FRACTION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, select, validation): :func:`split_parts`, with a share ``holdout`` of each training part set aside."""
    if not 0 < holdout < 1:
        raise ValueError(f"the held-out share of the training part must be between 0 and 1 (got {holdout})")
    fit, select, val, offset = [], [], [], 0
    for n in sizes:
        t, v = split_indices(n, seed, train_fraction)
        perm = np.random.RandomState(1000 + seed).permutation(len(t))
        cut = len(t) - max(1, round(holdout * len(t)))
        if cut < 1:
            raise ValueError(f"a training part of {len(t)} item(s) cannot spare a held-out share {holdout}")
        fit.append(t[perm[:cut]] + offset)
        select.append(t[perm[cut:]] + offset)
        val.append(v + offset)
        offset += n
    return np.concatenate(fit), np.concatenate(select), np.concatenate(val)
