"""Pure-Python twin of ``_nms_gpu_post.pyx`` (used when the Cython extension is not built)."""

import numpy as np


def _nms_gpu_post(mask: np.ndarray, n_bbox: int, threads_per_block: int, col_blocks: int):
    """Walk the boxes best first, keeping each one that no kept box has marked.

    Args:
        mask: ``(R * B,)`` uint64, row ``i`` holding ``B = col_blocks`` words; bit ``k`` of word ``c`` is
            set when box ``i`` suppresses box ``threads_per_block * c + k``. Only the words
            ``c >= i // threads_per_block`` are read.
        n_bbox: R.
        threads_per_block: boxes per word (64).
        col_blocks: B.

    Returns:
        ``(selection, n_selection)``: ``(R,)`` int32 whose first ``n_selection`` entries are the kept
        positions, ascending.
    """
    rows = np.asarray(mask, dtype=np.uint64).reshape(n_bbox, col_blocks)  # (R, B)
    remv = np.zeros(col_blocks, dtype=np.uint64)  # union of the rows of the kept boxes
    selection = np.zeros(n_bbox, dtype=np.int32)
    n_selection = 0
    for i in range(n_bbox):
        n_block, bit = divmod(i, threads_per_block)
        if not (int(remv[n_block]) >> bit) & 1:
            selection[n_selection] = i
            n_selection += 1
            remv[n_block:] |= rows[i, n_block:]
    return selection, n_selection
