"""Vectorised-numpy twin of ``_nms_cpu.pyx`` (used when the Cython extension is not built).

Same float32 operations as the CUDA kernel, so it keeps exactly the same boxes. Work proceeds in blocks of
``_BLOCK`` surviving candidates: greedy NMS inside the block, then the block's kept boxes suppress every later
candidate at once. Memory stays ``O(_BLOCK * _CHUNK)`` whatever R is.
"""

import numpy as np

_BLOCK = 128  # candidates resolved together (64 to 256 run alike on 12000 RPN-like boxes)
_CHUNK = 16384  # later candidates compared at once, bounding the (_BLOCK, _CHUNK) temporaries


def _nms_cpu(bbox: np.ndarray, thresh: float, limit: int) -> np.ndarray:
    """Positions of the boxes kept by greedy NMS, over boxes already sorted best first.

    Args:
        bbox: ``(R, 4)`` float32 ``(y_min, x_min, y_max, x_max)``, best box first.
        thresh: a later box is suppressed by a kept box when their IoU is ``>= thresh`` (float32).
        limit: stop once this many boxes are kept (``0 <= limit <= R``).

    Returns:
        ``(K,)`` int32 positions into ``bbox``, ascending, ``K <= limit``.
    """
    thresh = np.float32(thresh)
    y_min, x_min, y_max, x_max = (np.ascontiguousarray(bbox[:, k], dtype=np.float32) for k in range(4))
    area = (y_max - y_min) * (x_max - x_min)

    def suppresses(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``(len(rows), len(cols))`` bool: IoU of box ``rows[a]`` with box ``cols[b]`` is ``>= thresh``."""
        # The kernel's operations in the kernel's order, in place: fresh (H, M) temporaries cost more than the
        # arithmetic.
        height = np.minimum(y_max[rows, None], y_max[cols])
        height -= np.maximum(y_min[rows, None], y_min[cols])
        np.maximum(height, np.float32(0), out=height)
        width = np.minimum(x_max[rows, None], x_max[cols])
        width -= np.maximum(x_min[rows, None], x_min[cols])
        np.maximum(width, np.float32(0), out=width)
        inter = np.multiply(height, width, out=height)
        union = np.add(area[rows, None], area[cols], out=width)
        union -= inter
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 between two empty boxes: NaN, not kept
            inter /= union
        return inter >= thresh

    keep = []
    n_keep = 0
    alive = np.arange(bbox.shape[0])  # positions not suppressed yet, ascending
    while alive.size and n_keep < limit:
        head, rest = alive[:_BLOCK], alive[_BLOCK:]
        within = np.triu(suppresses(head, head), k=1)  # (H, H), only later boxes
        kept = np.ones(head.size, dtype=bool)
        for r in range(head.size):
            if kept[r]:
                kept &= ~within[r]
        head = head[kept]
        keep.append(head)
        n_keep += head.size
        if rest.size:
            dead = np.concatenate([suppresses(head, rest[c:c + _CHUNK]).any(axis=0)
                                   for c in range(0, rest.size, _CHUNK)])
            rest = rest[~dead]
        alive = rest
    if not keep:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(keep)[:limit].astype(np.int32)
