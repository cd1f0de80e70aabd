"""Which images go together: training batches of similar aspect ratio, test batches of one size, and the
share of each process under torchrun.

An epoch is a list of *batches*, each a list of indices into the data set, fixed when the epoch starts, so
that a checkpoint can store it and a resumed run continue it exactly (``utils/run_state.py``).

* Training (:func:`group_batches`): the epoch's shuffled order is cut into batches of images whose aspect
  ratios fall into the same bin, as torchvision's ``GroupedBatchSampler`` does with
  ``--aspect-ratio-group-factor 3`` (and jwyang's faster-rcnn with its ratio groups), so that padding to a
  common size stays small. With one image per batch this is the shuffled order itself.
* Several processes (:func:`shard`): every process holds the same list of *global* batches of
  ``batch_size x world_size`` images and trains on its own consecutive slice of each, so that K processes
  with B images each see exactly the images one process with K x B would.
* Test (:func:`size_batches`): only images of the same preprocessed size share a batch; nothing is padded,
  so the detections of an image do not depend on the test batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["aspect_ratio_groups", "group_batches", "pad_batches", "shard", "size_batches"]

# torchvision's references: 2 * factor + 1 bins, log-spaced between ratios 1/2 and 2 (factor 3)
ASPECT_RATIO_GROUP_FACTOR = 3


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]],
                        factor: int = ASPECT_RATIO_GROUP_FACTOR) -> np.ndarray:
    """The aspect-ratio bin of each image, as torchvision's ``create_aspect_ratio_groups``.

    Args:
        sizes: ``(H, W)`` of each image (the original size: the resize keeps the ratio).
        factor: bins ``2 ** linspace(-1, 1, 2 * factor + 1)`` of ``W / H``; 0 puts every image in one group.

    Returns:
        ``(N,)`` int64 group ids.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if factor == 0:
        return np.zeros(len(sizes), np.int64)
    bins = 2 ** np.linspace(-1, 1, 2 * factor + 1)
    return np.digitize(sizes[:, 1] / sizes[:, 0], bins).astype(np.int64)


def group_batches(order: Sequence[int], groups: np.ndarray, batch_size: int) -> list[list[int]]:
    """Cut ``order`` into batches of ``batch_size`` indices of one group (torchvision's
    ``GroupedBatchSampler``): going down ``order``, each index joins its group's open batch, which is emitted
    when full. The indices left in open batches at the end are emitted last, in order of their first index,
    in batches of ``batch_size`` regardless of group (so every index is used once).

    Args:
        order: the epoch's indices, in the order to visit them.
        groups: ``groups[i]`` is the group of index ``i`` (:func:`aspect_ratio_groups`).
        batch_size: images per batch, ``>= 1``.

    Returns:
        The batches; with ``batch_size=1``, ``[[i] for i in order]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches, open_batches = [], {}
    for index in order:
        batch = open_batches.setdefault(int(groups[index]), [])
        batch.append(int(index))
        if len(batch) == batch_size:
            batches.append(open_batches.pop(int(groups[index])))
    leftover = [i for batch in sorted(open_batches.values(), key=lambda b: b[0]) for i in batch]
    batches += [leftover[k:k + batch_size] for k in range(0, len(leftover), batch_size)]
    return batches


def shard(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """Process ``rank``'s part of global batches of ``world_size`` equal slices.

    Every global batch must hold a multiple of ``world_size`` indices (:func:`pad_batches`); process ``r``
    takes the ``r``-th of the ``world_size`` consecutive slices of each.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size} processes")
    shares = []
    for batch in batches:
        if len(batch) % world_size:
            raise ValueError(f"a global batch of {len(batch)} images cannot be shared by {world_size} "
                             "processes (pad_batches first)")
        per_rank = len(batch) // world_size
        shares.append(list(batch[rank * per_rank:(rank + 1) * per_rank]))
    return shares


def pad_batches(batches: list[list[int]], batch_size: int, order: Sequence[int]) -> list[list[int]]:
    """Fill the incomplete batches (the last ones) up to ``batch_size`` with indices from the start of
    ``order``, as ``DistributedSampler`` pads its shards, so that every process gets a full share."""
    pool = iter(np.resize(np.asarray(order, dtype=np.int64), max(len(order), batch_size)).tolist())
    return [batch + [next(pool) for _ in range(batch_size - len(batch))] for batch in batches]


def size_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of at most ``batch_size`` indices of images of one size, in index order of their first
    image (a batch is emitted when full, the others at the end of their size).

    Args:
        sizes: the preprocessed ``(H', W')`` of each image.
        batch_size: the most images per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches, open_batches = [], {}
    for index, size in enumerate(sizes):
        batch = open_batches.setdefault(tuple(size), [])
        batch.append(index)
        if len(batch) == batch_size:
            batches.append(open_batches.pop(tuple(size)))
    batches += open_batches.values()
    return sorted(batches, key=lambda b: b[0])
