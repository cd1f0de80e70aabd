# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Reduce the CUDA kernel's suppression bitmask to the kept boxes.

The pure-Python twin is ``_nms_gpu_post_py.py``.
"""

import numpy as np

from libc.stdint cimport uint64_t


def _nms_gpu_post(const uint64_t[::1] mask, Py_ssize_t n_bbox, Py_ssize_t threads_per_block,
                  Py_ssize_t col_blocks):
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
    remv_a = np.zeros(col_blocks, dtype=np.uint64)  # union of the rows of the kept boxes
    selection_a = np.zeros(n_bbox, dtype=np.int32)
    cdef uint64_t[::1] remv = remv_a
    cdef int[::1] selection = selection_a
    cdef Py_ssize_t i, j, n_block, n_selection = 0
    cdef uint64_t bit
    with nogil:
        for i in range(n_bbox):
            n_block = i // threads_per_block
            bit = (<uint64_t>1) << (i % threads_per_block)
            if not (remv[n_block] & bit):
                selection[n_selection] = <int>i
                n_selection += 1
                for j in range(n_block, col_blocks):
                    remv[j] |= mask[i * col_blocks + j]
    return selection_a, n_selection
