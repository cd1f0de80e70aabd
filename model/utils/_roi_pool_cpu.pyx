# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""RoI max pooling forward on the CPU in Cython: the CUDA kernel's loop, over a channels-last map.

The semantics (bins, rounding, empty bins, ties) are those of ``model/roi_module.py``'s docstring and of the
forward kernel in ``model/utils/roi_cupy.py``; ``roi_module.roi_pool_forward_torch`` is the torch twin used
when this extension is not built. Bins are computed in the map's own precision (``floating``), as the kernel
computes them in float32.

The map is read channels-last, so that the innermost loop runs over contiguous channels: each cell of a bin
updates the running maxima of all ``C`` channels at once (one vectorisable pass), the first maximum in
row-major order winning as in the kernel (strict ``>``).
"""

from libc.math cimport ceil, floor, round

ctypedef fused floating:
    float
    double


def roi_pool_forward_nhwc(const floating[:, :, :, ::1] x, const floating[:, ::1] rois, int outh, int outw,
                          floating spatial_scale, floating[:, :, :, ::1] y, int[:, :, :, ::1] argmax,
                          bint with_argmax):
    """Pool every roi of ``x`` into ``y`` (and ``argmax``), both ``(R, OH, OW, C)``.

    Args:
        x: ``(N, H, W, C)`` C-contiguous map (a channels-last ``(N, C, H, W)`` tensor, permuted).
        rois: ``(R, 5)`` ``(batch_index, x_min, y_min, x_max, y_max)``, batch indices valid integers.
        outh, outw: pooled size.
        spatial_scale: feature cells per input pixel, in ``x``'s precision.
        y: ``(R, OH, OW, C)`` output values (written).
        argmax: ``(R, OH, OW, C)`` int32 flat index ``h * W + w`` of each maximum, -1 in empty bins
            (written when ``with_argmax``; otherwise any array, e.g. empty, left untouched).
    """
    cdef Py_ssize_t n_roi = rois.shape[0], height = x.shape[1], width = x.shape[2], channels = x.shape[3]
    cdef Py_ssize_t r, ph, pw, h, w, c, b, hstart, hend, wstart, wend
    cdef int start_w, start_h, end_w, end_h, roi_h, roi_w, cell
    cdef floating bin_h, bin_w, v, m
    cdef int k
    cdef floating* out
    cdef int* index = NULL
    cdef const floating* row
    with nogil:
        for r in range(n_roi):
            b = <Py_ssize_t>rois[r, 0]
            start_w = <int>round(rois[r, 1] * spatial_scale)
            start_h = <int>round(rois[r, 2] * spatial_scale)
            end_w = <int>round(rois[r, 3] * spatial_scale)
            end_h = <int>round(rois[r, 4] * spatial_scale)
            roi_w = end_w - start_w + 1 if end_w - start_w + 1 > 1 else 1
            roi_h = end_h - start_h + 1 if end_h - start_h + 1 > 1 else 1
            bin_h = <floating>roi_h / <floating>outh
            bin_w = <floating>roi_w / <floating>outw
            for ph in range(outh):
                hstart = _clip(<Py_ssize_t>floor(<floating>ph * bin_h) + start_h, height)
                hend = _clip(<Py_ssize_t>ceil(<floating>(ph + 1) * bin_h) + start_h, height)
                for pw in range(outw):
                    wstart = _clip(<Py_ssize_t>floor(<floating>pw * bin_w) + start_w, width)
                    wend = _clip(<Py_ssize_t>ceil(<floating>(pw + 1) * bin_w) + start_w, width)
                    out = &y[r, ph, pw, 0]
                    if with_argmax:
                        index = &argmax[r, ph, pw, 0]
                    if hend <= hstart or wend <= wstart:  # empty bin
                        for c in range(channels):
                            out[c] = 0
                        if with_argmax:
                            for c in range(channels):
                                index[c] = -1
                        continue
                    # The bin's first cell starts the maxima; visiting it again changes nothing (strict >).
                    row = &x[b, hstart, wstart, 0]
                    for c in range(channels):
                        out[c] = row[c]
                    if with_argmax:
                        cell = <int>(hstart * width + wstart)
                        for c in range(channels):
                            index[c] = cell
                    for h in range(hstart, hend):
                        for w in range(wstart, wend):
                            row = &x[b, h, w, 0]
                            if with_argmax:
                                # Unconditional loads and stores around a select on locals: the compiler
                                # vectorises that pass over channels, not a conditional store.
                                cell = <int>(h * width + w)
                                for c in range(channels):
                                    v = row[c]
                                    m = out[c]
                                    k = index[c]
                                    if v > m:
                                        m = v
                                        k = cell
                                    out[c] = m
                                    index[c] = k
                            else:
                                for c in range(channels):
                                    v = row[c]
                                    out[c] = v if v > out[c] else out[c]

cdef inline Py_ssize_t _clip(Py_ssize_t v, Py_ssize_t upper) noexcept nogil:
    """``min(max(v, 0), upper)``."""
    return 0 if v < 0 else (upper if v > upper else v)
