"""scikit-learn's 8x8 handwritten digits: a dataset that needs no download.

1797 images with values 0..16, shipped inside scikit-learn. It is small enough to train
on in seconds on a laptop CPU, which makes it the dataset for smoke tests and examples.
It has no official test set, so we hold out a fixed, class-stratified 20%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from netshrink.data.base import RawArrays

TEST_FRACTION = 0.2
SPLIT_SEED = 0
CLASS_NAMES = [str(d) for d in range(10)]


def _stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Put ``round(fraction * n_c)`` images of each class ``c`` in test, chosen at random.

    Returns:
        Train and test indices, each in the order of one seeded permutation: keeping that
        order means a later ``train_limit`` (first N images) still sees every class.
    """
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        is_test[rng.permutation(members)[: round(fraction * len(members))]] = True
    # Order both sides by a separate permutation, so an image's position does not depend
    # on whether its class filled its test quota early.
    order = rng.permutation(len(labels))
    return order[~is_test[order]], order[is_test[order]]


def read_digits(root: Path | None = None) -> RawArrays:
    """Load ``sklearn.datasets.load_digits()`` as uint8 ``[N, 1, 8, 8]`` images.

    Args:
        root: ignored. The data ships inside scikit-learn, so there is no folder to read;
            the argument exists only so every reader has the same signature.

    Returns:
        About 80% of the 1797 images as train and 20% (stratified by class, seed 0, the
        same on every machine) as test; values scaled from 0..16 to 0..255; class names
        ``"0"`` .. ``"9"``.
    """
    del root  # see the docstring: nothing to read from disk
    # Imported here: scikit-learn takes about a second to import and only this reader needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    values = np.asarray(digits.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    images = np.rint(values * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    return RawArrays(
        torch.from_numpy(images[train_idx]),
        torch.from_numpy(labels[train_idx]),
        torch.from_numpy(images[test_idx]),
        torch.from_numpy(labels[test_idx]),
        list(CLASS_NAMES),
    )
