# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Greedy NMS on the CPU in Cython; selects exactly what the CUDA kernel plus its post-processing select.

The numpy twin is ``_nms_cpu_py.py``; see ``non_maximum_suppression.py`` for the semantics.
"""

import numpy as np


cdef inline float _max(float a, float b) noexcept nogil:
    return a if a > b else b


cdef inline float _min(float a, float b) noexcept nogil:
    return a if a < b else b


def _nms_cpu(const float[:, ::1] bbox, float thresh, Py_ssize_t limit):
    """Positions of the boxes kept by greedy NMS, over boxes already sorted best first.

    Args:
        bbox: ``(R, 4)`` float32 C-contiguous ``(y_min, x_min, y_max, x_max)``, best box first.
        thresh: a later box is suppressed by a kept box when their IoU is ``>= thresh`` (float32).
        limit: stop once this many boxes are kept (``0 <= limit <= R``).

    Returns:
        ``(K,)`` int32 positions into ``bbox``, ascending, ``K <= limit``.
    """
    cdef Py_ssize_t n_bbox = bbox.shape[0]
    # One contiguous array per coordinate, so the inner loop below vectorises.
    y_min_a = np.ascontiguousarray(bbox[:, 0])
    x_min_a = np.ascontiguousarray(bbox[:, 1])
    y_max_a = np.ascontiguousarray(bbox[:, 2])
    x_max_a = np.ascontiguousarray(bbox[:, 3])
    area_a = (y_max_a - y_min_a) * (x_max_a - x_min_a)  # float32, as the kernel computes it
    suppressed_a = np.zeros(n_bbox, dtype=np.int32)
    keep_a = np.empty(n_bbox, dtype=np.int32)
    cdef const float[::1] y_min = y_min_a, x_min = x_min_a, y_max = y_max_a, x_max = x_max_a, area = area_a
    cdef int[::1] suppressed = suppressed_a
    cdef int[::1] keep = keep_a
    cdef Py_ssize_t i, j, n_keep = 0
    cdef float height, width, inter

    with nogil:
        for i in range(n_bbox):
            if n_keep == limit:
                break
            if suppressed[i]:
                continue
            keep[n_keep] = <int>i
            n_keep += 1
            # Branch-free over every later box (suppressed or not): cheaper than skipping, as it vectorises.
            for j in range(i + 1, n_bbox):
                height = _max(_min(y_max[i], y_max[j]) - _max(y_min[i], y_min[j]), 0)
                width = _max(_min(x_max[i], x_max[j]) - _max(x_min[i], x_min[j]), 0)
                inter = height * width
                suppressed[j] |= inter / (area[i] + area[j] - inter) >= thresh
    return keep_a[:n_keep]
