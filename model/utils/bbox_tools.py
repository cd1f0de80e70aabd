"""Bounding-box arithmetic shared by the proposal layer, the target creators and ``predict``.

Shape symbols used below:

    R, S: numbers of boxes (sources, destinations, anchors...).
    K:    numbers of boxes on the other side of an IoU matrix.
    L:    number of classes whose offsets sit side by side in one ``loc`` row.

Naming rules: ``bbox`` is a box in pixels, ``(y_min, x_min, y_max, x_max)``; ``loc`` is the offset and
scale that turns one box into another, ``(t_y, t_x, t_h, t_w)``, as in Girshick et al., "Rich feature
hierarchies for accurate object detection and semantic segmentation" (R-CNN), appendix C.

Heights and widths are ``max - min`` without the "+1" of integer pixel boxes, like the original; only the
VOC evaluator (``utils/eval_tool.py``) adds it.
"""

import numpy as np

__all__ = ["loc2bbox", "bbox2loc", "bbox_iou", "generate_anchor_base"]


def _center_size(bbox):
    """``(R, 4)`` boxes -> centre y, centre x, height, width, each ``(R,)``."""
    height = bbox[:, 2] - bbox[:, 0]
    width = bbox[:, 3] - bbox[:, 1]
    return bbox[:, 0] + 0.5 * height, bbox[:, 1] + 0.5 * width, height, width


def loc2bbox(src_bbox, loc):
    """Decode boxes from source boxes and offsets (the inverse of :func:`bbox2loc`).

    With a source box of centre ``(p_y, p_x)`` and size ``(p_h, p_w)`` and offsets ``(t_y, t_x, t_h, t_w)``:

        g_y = p_h t_y + p_y,    g_x = p_w t_x + p_x,    g_h = p_h exp(t_h),    g_w = p_w exp(t_w)

    and the decoded box is ``(g_y - g_h / 2, g_x - g_w / 2, g_y + g_h / 2, g_x + g_w / 2)``. As in the
    original there is no clamp on ``t_h, t_w`` before ``exp``.

    Args:
        src_bbox: ``(R, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        loc: ``(R, 4 * L)`` float array; each row holds ``L`` groups ``(t_y, t_x, t_h, t_w)``, all decoded
            against the same source box (``predict`` uses this for the per-class offsets of the head).

    Returns:
        ``(R, 4 * L)`` array of ``loc``'s dtype, ``(y_min, x_min, y_max, x_max)`` per group.
    """
    if src_bbox.shape[0] == 0:
        return np.zeros((0, loc.shape[1]), dtype=loc.dtype)
    src_bbox = src_bbox.astype(loc.dtype, copy=False)
    ctr_y, ctr_x, src_h, src_w = (a[:, None] for a in _center_size(src_bbox))

    dy, dx, dh, dw = loc[:, 0::4], loc[:, 1::4], loc[:, 2::4], loc[:, 3::4]
    ctr_y = dy * src_h + ctr_y
    ctr_x = dx * src_w + ctr_x
    h = np.exp(dh) * src_h
    w = np.exp(dw) * src_w

    dst_bbox = np.empty(loc.shape, dtype=loc.dtype)
    dst_bbox[:, 0::4] = ctr_y - 0.5 * h
    dst_bbox[:, 1::4] = ctr_x - 0.5 * w
    dst_bbox[:, 2::4] = ctr_y + 0.5 * h
    dst_bbox[:, 3::4] = ctr_x + 0.5 * w
    return dst_bbox


def bbox2loc(src_bbox, dst_bbox):
    """Encode the offsets that move each source box onto its destination box.

        t_y = (g_y - p_y) / p_h,   t_x = (g_x - p_x) / p_w,   t_h = log(g_h / p_h),   t_w = log(g_w / p_w)

    Source heights and widths are floored at the dtype's machine epsilon, so a degenerate source box gives
    large but finite offsets instead of a division by zero.

    Args:
        src_bbox: ``(R, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        dst_bbox: ``(R, 4)`` float array, same order; row ``i`` is the target of ``src_bbox[i]``.

    Returns:
        ``(R, 4)`` array of ``(t_y, t_x, t_h, t_w)`` in the dtype of ``src_bbox``.
    """
    ctr_y, ctr_x, height, width = _center_size(src_bbox)
    base_ctr_y, base_ctr_x, base_height, base_width = _center_size(dst_bbox)

    eps = np.finfo(height.dtype).eps
    height = np.maximum(height, eps)
    width = np.maximum(width, eps)

    dy = (base_ctr_y - ctr_y) / height
    dx = (base_ctr_x - ctr_x) / width
    dh = np.log(base_height / height)
    dw = np.log(base_width / width)
    return np.stack((dy, dx, dh, dw), axis=1).astype(src_bbox.dtype, copy=False)


def bbox_iou(bbox_a, bbox_b):
    """Intersection over union of every pair of boxes.

    Output dtype: ``np.result_type`` of the inputs, except that integers (and bools) give float64 (numpy's
    usual promotion of a division) and float16 gives float32 (float16 areas overflow at 65504, a 256-pixel
    square). A float32 or float64 input is used as it is, so float32 boxes are computed in float32 (the
    target creators' case) and a float32 input next to a float64 one keeps its own areas in float32, numpy's
    mixed arithmetic; any other input is converted to the output dtype first.

    Args:
        bbox_a: ``(R, 4)`` array, ``(y_min, x_min, y_max, x_max)``; float32 in the model, any real dtype.
        bbox_b: ``(K, 4)`` array, same order.

    Returns:
        ``(R, K)`` array of the dtype above; element ``(i, k)`` is the IoU of ``bbox_a[i]`` and
        ``bbox_b[k]``. Boxes that only touch (or do not meet) have IoU 0; two empty boxes give 0, not NaN.

    Raises:
        IndexError: when either input does not have 4 columns.
    """
    bbox_a, bbox_b = np.asarray(bbox_a), np.asarray(bbox_b)
    if bbox_a.ndim != 2 or bbox_a.shape[1] != 4 or bbox_b.ndim != 2 or bbox_b.shape[1] != 4:
        raise IndexError(
            f"bbox_iou wants two (R, 4) arrays, got shapes {bbox_a.shape} and {bbox_b.shape}")
    dtype = _iou_dtype(np.result_type(bbox_a, bbox_b))
    bbox_a, bbox_b = (b if b.dtype in (np.float32, np.float64) else b.astype(dtype) for b in (bbox_a, bbox_b))
    # (R, K) intersection sides, coordinate by coordinate: the same float operations as corners and np.prod
    # (a product of two), 3.5x faster on the creators' (20000, G) matrices (bench/host.py).
    height = np.minimum(bbox_a[:, None, 2], bbox_b[:, 2]) - np.maximum(bbox_a[:, None, 0], bbox_b[:, 0])
    width = np.minimum(bbox_a[:, None, 3], bbox_b[:, 3]) - np.maximum(bbox_a[:, None, 1], bbox_b[:, 1])
    area_i = np.clip(height, 0, None) * np.clip(width, 0, None)
    area_a = (bbox_a[:, 2] - bbox_a[:, 0]) * (bbox_a[:, 3] - bbox_a[:, 1])
    area_b = (bbox_b[:, 2] - bbox_b[:, 0]) * (bbox_b[:, 3] - bbox_b[:, 1])
    union = area_a[:, None] + area_b - area_i
    return np.divide(area_i, union, out=np.zeros_like(area_i), where=union > 0)


def _iou_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype :func:`bbox_iou` computes in and returns for inputs of (promoted) ``dtype``."""
    if dtype == np.float16:
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.floating):
        return dtype
    return np.dtype(np.float64)


def generate_anchor_base(base_size=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    """The anchors of one feature-map cell, centred on the cell's centre ``(base_size / 2, base_size / 2)``.

    Anchor ``i * len(anchor_scales) + j`` has ratio ``ratios[i]`` and scale ``anchor_scales[j]``:
    ``h = base_size * scale * sqrt(ratio)``, ``w = base_size * scale * sqrt(1 / ratio)``, so a ratio is
    height over width (the original's docstring said width over height; its code, kept here, does this).
    Unlike py-faster-rcnn the sizes are not rounded and the centre is 8, not 7.5.

    Args:
        base_size: the feature stride in input pixels.
        ratios: height / width of the anchors.
        anchor_scales: side of the square anchor of ratio 1, in multiples of ``base_size``.

    Returns:
        ``(len(ratios) * len(anchor_scales), 4)`` float32, ``(y_min, x_min, y_max, x_max)`` relative to
        the top-left corner of the cell.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    scales = np.asarray(anchor_scales, dtype=np.float64)
    center = base_size / 2.0
    # (len(ratios), len(scales)) -> (A,), ratio-major.
    h = (base_size * scales[None, :] * np.sqrt(ratios[:, None])).ravel()
    w = (base_size * scales[None, :] * np.sqrt(1.0 / ratios[:, None])).ravel()
    anchor_base = np.stack(
        (center - h / 2.0, center - w / 2.0, center + h / 2.0, center + w / 2.0), axis=1)
    return anchor_base.astype(np.float32)
