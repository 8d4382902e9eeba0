"""Splits by patient: one patient's nights never sit on both sides of a split or of a CV fold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["group_folds", "split_by_group"]


def group_folds(groups: Sequence[Any] | np.ndarray, folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Held-out row indices of each fold; every group (patient) lies wholly in one fold.

    Groups are shuffled with ``seed`` and dealt, largest first, to the fold with the fewest rows so far
    (scikit-learn's ``GroupKFold``, but seeded); ``min(folds, number of groups)`` folds.

    Parameters
    ----------
    groups : sequence or numpy.ndarray
        One group label (patient id) per row; labels are compared as text.
    folds : int, default 5
        Folds wanted, at least 2.
    seed : int, default 0
        Seed of the shuffle that orders groups of equal size.

    Returns
    -------
    list of numpy.ndarray
        Per fold, the ascending row indices held out in it; every row is in exactly one fold.

    Raises
    ------
    ValueError
        ``folds`` not an integer >= 2, or fewer than 2 groups.
    """
    if int(folds) != folds or folds < 2:
        raise ValueError("folds must be an integer >= 2")
    g = np.asarray(groups, dtype=object).reshape(-1)
    # patient ids are compared as text: np.unique cannot order mixed Python types
    uniq, inverse, counts = np.unique(g.astype(str), return_inverse=True, return_counts=True)
    k = min(int(folds), len(uniq))
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 patients (groups); got {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros(k, dtype=np.int64)
    fold_of = np.empty(len(uniq), dtype=np.int64)
    for gi in order:
        f = int(np.argmin(load))
        fold_of[gi] = f
        load[f] += counts[gi]
    row_fold = fold_of[inverse.reshape(-1)]
    return [np.flatnonzero(row_fold == f) for f in range(k)]


def split_by_group(groups: Sequence[Any], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, held-out)`` indices into ``groups``: whole patients on each side.

    ``round(val_fraction * patients)`` patients (at least one, and at least one left for training),
    drawn with ``seed`` from the sorted patient ids, so the split depends on the set of patients only,
    not on the order of the rows.

    Parameters
    ----------
    groups : sequence
        One group label (patient id) per row; labels are compared as text.
    val_fraction : float, default 0.2
        Share of the patients held out, strictly between 0 and 1; the count is rounded half up.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    train : list of int
        Row indices of the training patients, ascending.
    held_out : list of int
        Row indices of the held-out patients, ascending.

    Raises
    ------
    ValueError
        ``val_fraction`` not in (0, 1), or fewer than 2 patients.

    Examples
    --------
    >>> groups = ["p1", "p1", "p2", "p3", "p4", "p5"]
    >>> train, held = split_by_group(groups, val_fraction=0.2)
    >>> len({groups[i] for i in held}), {groups[i] for i in train} & {groups[i] for i in held}
    (1, set())
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    keys = [str(g) for g in groups]
    patients = sorted(set(keys))
    if len(patients) < 2:
        raise ValueError(f"a split by patient needs at least 2 patients; got {len(patients)}")
    n_val = min(len(patients) - 1, max(1, math.floor(val_fraction * len(patients) + 0.5)))
    order = np.random.default_rng(seed).permutation(len(patients))
    held = {patients[i] for i in order[:n_val]}
    train = [i for i, k in enumerate(keys) if k not in held]
    val = [i for i, k in enumerate(keys) if k in held]
    return train, val
