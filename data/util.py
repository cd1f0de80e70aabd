"""Image reading and the box arithmetic that follows a resize or a flip of the image.

Images are ``(C, H, W)`` arrays, ``C`` = 3 (RGB) or 1 (grayscale), values in ``[0, 255]``. Boxes are
``(R, 4)`` arrays ``(y_min, x_min, y_max, x_max)`` in pixels of the image they belong to.
"""

import os

import numpy as np
from PIL import Image

__all__ = [
    "DataError", "ImageReadError", "read_image", "read_image_size", "resize_image", "resize_bbox",
    "flip_bbox", "random_flip",
]

# 16-bit grayscale (PNG/TIFF) opens in one of these modes; PIL's own conversion to 8 bits clips at 255
# instead of rescaling, so read_image rescales them itself. 'I' (32-bit integer) is read the same way,
# as Pillow releases before 10 opened 16-bit PNGs in that mode.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DataError(ValueError):
    """A file of a data set that cannot be used; ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageReadError(DataError):
    """An image file that is missing, truncated, not an image or in a mode that cannot become RGB."""


def _to_mode(img: Image.Image, mode: str) -> np.ndarray:
    """A loaded PIL image -> ``(H, W, 3)`` (``mode='RGB'``) or ``(H, W)`` (``mode='L'``) uint8 array."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # (H, W) 0-65535 -> 0-255, rounded; RGB repeats the gray channel.
        gray = np.asarray(img, dtype=np.float64)
        gray = np.rint(np.clip(gray, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return gray if mode == "L" else np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        raise ValueError("floating-point images (mode 'F') have no defined 0-255 range")
    # Alpha ('RGBA', 'LA', 'PA', 'P' with transparency) is dropped, not composited: the colour under a
    # transparent pixel is kept, as the original's convert('RGB') did. CMYK, YCbCr, '1' and palette images
    # are converted by PIL.
    return np.asarray(img.convert(mode))


def read_image(path: str | os.PathLike, dtype=np.float32, color: bool = True) -> np.ndarray:
    """Read an image file into a ``(C, H, W)`` array.

    Any mode PIL opens becomes RGB (``color=True``) or 8-bit gray (``color=False``; the original asked
    PIL for a palette image here, which is not gray): grayscale, 1-bit, 16-bit grayscale (rescaled from
    0-65535 to 0-255), CMYK, palette and images with an alpha channel (alpha dropped). The EXIF
    orientation tag is *not* applied: VOC boxes refer to the pixels as stored in the file.

    Args:
        path: the image file.
        dtype: dtype of the returned array.
        color: RGB when True, one gray channel when False.

    Returns:
        ``(3, H, W)`` RGB (or ``(1, H, W)`` gray) array of ``dtype``, values in ``[0, 255]``.

    Raises:
        ImageReadError: the file is missing, not an image, truncated or corrupt (PIL decodes lazily; the
            whole image is decoded here so that the error surfaces now, naming the file).
    """
    try:
        with Image.open(path) as img:
            img.load()
            array = _to_mode(img, "RGB" if color else "L")
    except FileNotFoundError as e:
        raise ImageReadError(path, "no such file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors; some decoders raise
        # SyntaxError or ValueError on corrupt headers.
        raise ImageReadError(path, f"cannot read image ({type(e).__name__}: {e})") from e
    if array.ndim == 2:
        return array[None].astype(dtype)  # (H, W) -> (1, H, W)
    return array.transpose((2, 0, 1)).astype(dtype)  # (H, W, C) -> (C, H, W)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file from its header, without decoding it (the size :func:`read_image` gives:
    no EXIF rotation).

    Raises:
        ImageReadError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError as e:
        raise ImageReadError(path, "no such file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"cannot read image ({type(e).__name__}: {e})") from e


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(i0, i1)`` and weight ``w1`` of each of ``n_out`` samples along one axis.

    Output sample ``j`` is centred at input coordinate ``x = (j + 0.5) * n_in / n_out - 0.5`` (pixel centres
    at integers, the image spans ``[-0.5, n_in - 0.5]``) and is ``(1 - w1) * in[i0] + w1 * in[i1]`` with
    ``i0 = floor(x)``, ``i1 = i0 + 1``, ``w1 = x - i0``. Indices outside ``[0, n_in - 1]`` are mirrored about
    the edge pixels (``-1 -> 1``, ``n_in -> n_in - 2``), scipy.ndimage's ``'mirror'`` mode.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(x)
    w1 = x - i0
    i0 = i0.astype(np.int64)
    taps = np.stack((i0, i0 + 1))
    if n_in == 1:
        taps[:] = 0
    else:
        period = 2 * (n_in - 1)
        taps = np.abs(taps) % period  # mirror about 0, then fold the far side back about n_in - 1
        taps = np.where(taps > n_in - 1, period - taps, taps)
    return taps[0], taps[1], w1


def resize_image(img: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a ``(C, H, W)`` float image to ``(C, H', W')``, without anti-aliasing.

    The same values (to float rounding) as the original's
    ``skimage.transform.resize(img, (C, H', W'), order=1, mode='reflect', anti_aliasing=False)``, i.e.
    ``scipy.ndimage.zoom(..., order=1, mode='mirror', grid_mode=True)``, computed as two separable passes
    of two-tap gathers, several times faster on the small images a training step reads.

    Args:
        img: ``(C, H, W)`` float32 or float64 array.
        out_size: ``(H', W')``, each >= 1.

    Returns:
        ``(C, H', W')`` array of ``img``'s dtype.
    """
    if img.ndim != 3:
        raise ValueError(f"resize_image wants a (C, H, W) image, got shape {img.shape}")
    out_h, out_w = out_size
    y0, y1, wy = _linear_taps(img.shape[1], out_h)
    x0, x1, wx = _linear_taps(img.shape[2], out_w)
    rows = _lerp(np.take(img, y0, axis=1), np.take(img, y1, axis=1), wy[:, None])  # (C, H', W)
    return _lerp(np.take(rows, x0, axis=2), np.take(rows, x1, axis=2), wx)  # (C, H', W')


def _lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a + w * (b - a)``, computed in place in the fresh arrays ``a`` and ``b`` (in ``a``'s dtype)."""
    b -= a
    b *= w.astype(a.dtype)
    a += b
    return a


def resize_bbox(bbox: np.ndarray, in_size: tuple[int, int], out_size: tuple[int, int]) -> np.ndarray:
    """Scale boxes from an image of size ``in_size`` to the same image resized to ``out_size``.

    Args:
        bbox: ``(R, 4)`` float array, ``(y_min, x_min, y_max, x_max)`` in pixels of the input image.
        in_size: ``(H, W)`` of the image before the resize.
        out_size: ``(H', W')`` after it.

    Returns:
        A new ``(R, 4)`` array (same dtype): y coordinates times ``H' / H``, x coordinates times ``W' / W``.
    """
    bbox = bbox.copy()
    y_scale = float(out_size[0]) / in_size[0]
    x_scale = float(out_size[1]) / in_size[1]
    bbox[:, 0] *= y_scale
    bbox[:, 2] *= y_scale
    bbox[:, 1] *= x_scale
    bbox[:, 3] *= x_scale
    return bbox


def flip_bbox(
    bbox: np.ndarray, size: tuple[int, int], y_flip: bool = False, x_flip: bool = False
) -> np.ndarray:
    """Boxes of an image flipped vertically and/or horizontally.

    As in the original (and ChainerCV), a coordinate ``x`` becomes ``W - x``: exact when coordinates are
    positions between pixels (pixel ``j`` spans ``[j, j + 1)``); for VOC's 0-based inclusive pixel
    indices it is one pixel off (``W - 1 - x`` would be exact), a difference kept for faithfulness.

    Args:
        bbox: ``(R, 4)`` float array, ``(y_min, x_min, y_max, x_max)``.
        size: ``(H, W)`` of the image.
        y_flip: the image was flipped upside down.
        x_flip: the image was flipped left to right.

    Returns:
        A new ``(R, 4)`` array (same dtype), still with ``min <= max`` in each box.
    """
    height, width = size
    bbox = bbox.copy()
    if y_flip:
        y_max = height - bbox[:, 0]
        y_min = height - bbox[:, 2]
        bbox[:, 0] = y_min
        bbox[:, 2] = y_max
    if x_flip:
        x_max = width - bbox[:, 1]
        x_min = width - bbox[:, 3]
        bbox[:, 1] = x_min
        bbox[:, 3] = x_max
    return bbox


def random_flip(
    img: np.ndarray,
    y_random: bool = False,
    x_random: bool = False,
    return_param: bool = False,
    copy: bool = False,
    rng: np.random.Generator | None = None,
):
    """Flip an image vertically and/or horizontally, each enabled axis with probability 1/2.

    Args:
        img: ``(C, H, W)`` array.
        y_random: maybe flip upside down.
        x_random: maybe flip left to right.
        return_param: also return which flips were made.
        copy: return a contiguous copy instead of a (negative-stride) view.
        rng: the generator that draws the flips (``None``: a fresh, unseeded one). A vertical draw, if
            enabled, is made before the horizontal one.

    Returns:
        The ``(C, H, W)`` image, and with ``return_param`` a dict ``{'y_flip': bool, 'x_flip': bool}``.
    """
    if rng is None:
        rng = np.random.default_rng()
    y_flip = bool(rng.random() < 0.5) if y_random else False
    x_flip = bool(rng.random() < 0.5) if x_random else False
    if y_flip:
        img = img[:, ::-1, :]
    if x_flip:
        img = img[:, :, ::-1]
    if copy:
        img = img.copy()
    if return_param:
        return img, {"y_flip": y_flip, "x_flip": x_flip}
    return img
