# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Greedy NMS on the CPU in Cython; selects exactly what the CUDA kernel plus its post-processing select.

The numpy twin is ``_nms_cpu_py.py``; see ``non_maximum_suppression.py`` for the semantics.

Each candidate, in ranking order, is compared with the boxes kept so far, and kept when none of them reaches
the threshold. That is the definition of the greedy selection, so the kept set is the CUDA kernel's (which
compares every pair); the IoU of each pair is the kernel's float32 operations in the kernel's order. The work
is smaller: the scan stops at the first suppressor, the boxes after the ``limit``-th kept one are never looked
at, and only kept boxes of a similar area are scanned (12000 RPN boxes at 0.7 with a limit of 2000: about 1
million IoUs, against 20 million when every kept box is compared with every later box).

Why comparing only similar areas is exact. Write ``a_k``, ``a_c`` for the float32 areas of a kept box and a
candidate, ``m`` the smaller and ``M`` the larger, ``u = 2**-24``. If the computed IoU is ``>= thresh > 0``:
it is a positive number, so the computed intersection is finite and positive and the union finite and
positive, which needs every coordinate finite and ``y_max > y_min``, ``x_max > x_min`` on both boxes, so
``0 < a_k, a_c < inf``. The clamped intersection sides are at most the boxes' sides and rounding is monotone,
so the computed intersection is ``<= m``; then the computed union is ``>= M (1 - 3u)`` and the computed IoU
``<= (m / M) (1 + 5u)``. Hence a kept box whose area lies outside ``[t' a_c, a_c / t']``, with
``t' = thresh (1 - 1e-6)``, cannot suppress the candidate, and a box whose area is not in ``(0, inf)`` (NaN
included) never suppresses nor is suppressed. Kept boxes sit in buckets of area (four per octave, cut by the
bits of the area, never by a rounded logarithm); a candidate scans the buckets that meet
``[t' a_c, a_c / t']``. Below ``thresh = 2**-100`` (or NaN) the bound is not used: one bucket, every kept box
scanned.
"""

import numpy as np

from libc.math cimport INFINITY
from libc.string cimport memcpy

# Kept boxes compared per step of the scan before checking for a suppressor: long enough to vectorise, short
# enough to stop soon after the first hit (32 to 128 run alike on RPN-like boxes).
cdef enum:
    _CHUNK = 64
# Relative margin of the area bound, far above its float32 rounding (5 * 2**-24).
cdef double _MARGIN = 1e-6
# Smallest threshold the area bound is used at (keeps IoUs that pass it away from subnormal rounding).
cdef float _MIN_BUCKETED_THRESH = 2.0 ** -100


cdef inline float _max(float a, float b) noexcept nogil:
    return a if a > b else b


cdef inline float _min(float a, float b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _bucket(double area) noexcept nogil:
    """Area bucket of a positive ``area``: its binary exponent and first two mantissa bits (four buckets per
    octave). Positive doubles order like their bit patterns, so this never decreases as ``area`` grows."""
    cdef unsigned long long bits
    memcpy(&bits, &area, sizeof(double))
    return <Py_ssize_t>(bits >> 50)


cdef tuple _area_buckets(const float[:, ::1] bbox, bint bucketed):
    """``(area, bucket, first)`` of the boxes: ``(R,)`` float32 areas as the kernel computes them, ``(R,)``
    intp area buckets minus ``first`` (the smallest), -1 for an area outside ``(0, inf)``. Not ``bucketed``:
    every box in bucket 0."""
    cdef Py_ssize_t n_bbox = bbox.shape[0], j
    area_a = np.empty(n_bbox, dtype=np.float32)
    bucket_a = np.zeros(n_bbox, dtype=np.intp)
    cdef float[::1] area = area_a
    cdef Py_ssize_t[::1] bucket = bucket_a
    with nogil:
        for j in range(n_bbox):
            area[j] = (bbox[j, 2] - bbox[j, 0]) * (bbox[j, 3] - bbox[j, 1])
            if bucketed:
                bucket[j] = _bucket(area[j]) if 0 < area[j] < INFINITY else -1
    valid = bucket_a >= 0
    first = int(bucket_a[valid].min()) if valid.any() else 0
    bucket_a[valid] -= first  # at most about 1100 buckets: float32 areas span about 280 octaves
    return area_a, bucket_a, first


cdef inline bint _suppressed(const float* y_min, const float* x_min, const float* y_max, const float* x_max,
                             const float* area, Py_ssize_t n, float cy_min, float cx_min, float cy_max,
                             float cx_max, float c_area, float thresh) noexcept nogil:
    """Whether one of the ``n`` kept boxes has ``IoU >= thresh`` with the candidate box ``c``."""
    cdef Py_ssize_t start = 0, stop, k
    cdef float height, width, inter
    cdef int hit
    while start < n:
        stop = start + _CHUNK if start + _CHUNK < n else n
        hit = 0
        # Branch-free inside a chunk, so it vectorises. The kernel's float32 operations in the kernel's order,
        # the kept (earlier) box first: IoU(kept, candidate) as the kernel computes IoU(row, column).
        for k in range(start, stop):
            height = _max(_min(y_max[k], cy_max) - _max(y_min[k], cy_min), 0)
            width = _max(_min(x_max[k], cx_max) - _max(x_min[k], cx_min), 0)
            inter = height * width
            hit |= inter / (area[k] + c_area - inter) >= thresh
        if hit:
            return True
        start = stop
    return False


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
    area_a, bucket_a, first_bucket = _area_buckets(bbox, thresh >= _MIN_BUCKETED_THRESH)
    # Region b of the kept boxes holds bucket b's: as many slots as it has candidates, from start[b].
    counts = np.bincount(bucket_a[bucket_a >= 0], minlength=1)
    start_a = np.zeros(len(counts), dtype=np.intp)
    np.cumsum(counts[:len(counts) - 1], out=start_a[1:])
    filled_a = np.zeros(len(counts), dtype=np.intp)
    # One contiguous array per coordinate (and the area), so the scan vectorises.
    kept_a = np.empty((5, max(n_bbox, 1)), dtype=np.float32)
    keep_a = np.empty(limit, dtype=np.int32)

    cdef const float[::1] area = area_a
    cdef const Py_ssize_t[::1] bucket = bucket_a, start = start_a
    cdef Py_ssize_t[::1] filled = filled_a
    cdef float[:, ::1] kept = kept_a
    cdef int[::1] keep = keep_a
    cdef float* y_min = &kept[0, 0]
    cdef float* x_min = &kept[1, 0]
    cdef float* y_max = &kept[2, 0]
    cdef float* x_max = &kept[3, 0]
    cdef float* k_area = &kept[4, 0]
    cdef Py_ssize_t first = first_bucket, last = len(counts) - 1, j, b, s, b_low = 0, b_high = 0, n_keep = 0
    cdef double low = thresh * (1 - _MARGIN)  # t' of the area bound
    cdef float cy_min, cx_min, cy_max, cx_max, c_area
    cdef bint suppressed

    with nogil:
        for j in range(n_bbox):
            if n_keep == limit:
                break
            if bucket[j] >= 0:  # else: an area outside (0, inf), IoU < thresh with every box
                cy_min, cx_min, cy_max, cx_max = bbox[j, 0], bbox[j, 1], bbox[j, 2], bbox[j, 3]
                c_area = area[j]
                if last > 0:  # the buckets that meet [t' a_c, a_c / t']
                    b_low = max(_bucket(c_area * low) - first, 0)
                    b_high = min(_bucket(c_area / low) - first, last)
                suppressed = False
                for b in range(b_low, b_high + 1):
                    s = start[b]
                    if _suppressed(y_min + s, x_min + s, y_max + s, x_max + s, k_area + s, filled[b], cy_min,
                                   cx_min, cy_max, cx_max, c_area, thresh):
                        suppressed = True
                        break
                if suppressed:
                    continue
                s = start[bucket[j]] + filled[bucket[j]]
                y_min[s], x_min[s], y_max[s], x_max[s], k_area[s] = cy_min, cx_min, cy_max, cx_max, c_area
                filled[bucket[j]] += 1
            keep[n_keep] = <int>j
            n_keep += 1
    return keep_a[:n_keep]
