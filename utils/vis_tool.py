"""Pictures of detections (matplotlib) and the training dashboard (visdom, TensorBoard event files, and a
history in the run folder).

Drawing renders off-screen through ``matplotlib.figure.Figure`` and the Agg canvas, so it works headless with
current Matplotlib and never changes the pyplot backend (a notebook keeps its inline plots): only
:func:`vis_image` without an ``ax`` opens a pyplot figure, which is what a notebook user wants to see.

Images are ``(3, H, W)`` RGB in ``[0, 255]`` (numpy arrays or tensors); boxes are ``(R, 4)``
``(y_min, x_min, y_max, x_max)`` in pixels of that image.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import socket
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from urllib.parse import urlparse

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from utils.array_tool import tonumpy
from utils.files import atomic_write

__all__ = ["TensorBoardUnavailableWarning", "Visualizer", "VisdomUnavailableWarning", "fig4vis",
           "plot_evaluation", "plot_training_pictures", "vis_bbox", "vis_image", "visdom_bbox"]

# Seconds to wait for a visdom server to accept a connection, and for it to answer a request (a shorter wait
# for the first request: a port that accepts but never answers must not hold up the start of a run).
CONNECT_TIMEOUT = 1.0
FIRST_READ_TIMEOUT = 2.0
READ_TIMEOUT = 10.0


def _as_array(data) -> np.ndarray:
    return tonumpy(data) if not isinstance(data, (list, tuple)) else np.asarray(data)


def vis_image(img, ax: Axes | None = None) -> Axes:
    """Show an image.

    Args:
        img: ``(3, H, W)`` RGB in ``[0, 255]`` (values outside are clipped), numpy array or tensor.
        ax: where to draw; ``None`` opens a new pyplot figure (shown inline in a notebook).

    Returns:
        The ``Axes`` drawn on.
    """
    img = _as_array(img)
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"vis_image expects a (3, H, W) RGB image, got shape {img.shape}")
    if ax is None:
        import matplotlib.pyplot as plt

        ax = plt.figure().add_subplot(1, 1, 1)
    ax.imshow(np.clip(img, 0, 255).transpose((1, 2, 0)).astype(np.uint8))  # (3, H, W) -> (H, W, 3)
    return ax


def vis_bbox(img, bbox, label=None, score=None, ax: Axes | None = None,
             label_names: Sequence[str] | None = None) -> Axes:
    """Show an image with boxes: red outlines, captions ``"name: 0.xx"`` at their top-left corners.

    Args:
        img: ``(3, H, W)`` RGB in ``[0, 255]``.
        bbox: ``(R, 4)`` ``(y_min, x_min, y_max, x_max)`` in pixels of ``img``.
        label: ``(R,)`` integer labels in ``[0, len(label_names))``, optional; a label outside that range is
            shown as its number.
        score: ``(R,)`` scores, optional (shown with two decimals).
        ax: where to draw; ``None`` opens a new pyplot figure.
        label_names: class names in label order; default the 20 VOC names.

    Returns:
        The ``Axes`` drawn on.

    Raises:
        ValueError: ``bbox`` is not ``(R, 4)``, or ``label``/``score`` do not have ``R`` entries.
    """
    bbox = _as_array(bbox).reshape(-1, 4) if len(bbox) == 0 else _as_array(bbox)
    if bbox.ndim != 2 or bbox.shape[1] != 4:
        raise ValueError(f"bbox must have shape (R, 4), got {bbox.shape}")
    if label is not None and len(label) != len(bbox):
        raise ValueError(f"label has {len(label)} entries for {len(bbox)} boxes")
    if score is not None and len(score) != len(bbox):
        raise ValueError(f"score has {len(score)} entries for {len(bbox)} boxes")
    if label_names is None:
        from data.voc_dataset import VOC_BBOX_LABEL_NAMES

        label_names = VOC_BBOX_LABEL_NAMES
    ax = vis_image(img, ax=ax)
    label = None if label is None else _as_array(label)
    score = None if score is None else _as_array(score)
    for i, (y_min, x_min, y_max, x_max) in enumerate(bbox.tolist()):
        ax.add_patch(Rectangle((x_min, y_min), x_max - x_min, y_max - y_min,
                               fill=False, edgecolor="red", linewidth=2))
        caption = []
        if label is not None:
            lb = int(label[i])
            caption.append(label_names[lb] if 0 <= lb < len(label_names) else str(lb))
        if score is not None:
            caption.append(f"{float(score[i]):.2f}")
        if caption:
            ax.text(x_min, y_min, ": ".join(caption), style="italic",
                    bbox={"facecolor": "white", "alpha": 0.5, "pad": 0})
    return ax


def fig4vis(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an image for visdom, and close it if pyplot manages it.

    Returns:
        ``(3, H, W)`` float32 RGB in ``[0, 1]``; ``H, W`` are the figure's size in pixels. Transparent parts
        are composited over white.
    """
    canvas = fig.canvas if hasattr(fig.canvas, "buffer_rgba") else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255  # (H, W, 4), straight alpha
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    if fig.canvas.manager is not None:  # made by pyplot: free it as the original's plot.close() did
        import matplotlib.pyplot as plt

        plt.close(fig)
    return np.ascontiguousarray(rgb.transpose((2, 0, 1)))  # (H, W, 3) -> (3, H, W)


def visdom_bbox(*args, **kwargs) -> np.ndarray:
    """:func:`vis_bbox` drawn on an off-screen figure and rendered by :func:`fig4vis`: ``(3, H, W)``
    float32 RGB in ``[0, 1]``."""
    fig = Figure()
    FigureCanvasAgg(fig)
    vis_bbox(*args, ax=fig.add_subplot(1, 1, 1), **kwargs)
    return fig4vis(fig)


def plot_evaluation(vis: Visualizer, result: dict, step: int) -> None:
    """Plot an evaluation result (``utils.evaluation.score``) at training step ``step``: ``test_map`` (VOC07
    mAP, or COCO AP), and COCO's AP50, AP75, APs, APm, APl as ``test_AP50``... for COCO data."""
    vis.plot("test_map", result["map"], step=step)
    if result.get("metric") == "coco":
        for key in ("AP50", "AP75", "APs", "APm", "APl"):
            if math.isfinite(result[key]):
                vis.plot(f"test_{key}", result[key], step=step)


def plot_training_pictures(vis: Visualizer, trainer, img, bbox, label) -> None:
    """The original's pictures of a plot step, when visdom is connected or TensorBoard is on: the ground
    truth and the prediction of the training image, and both confusion matrices of the trainer's meters.
    With neither, nothing is drawn or predicted.

    In TensorBoard they land at the step last plotted (``vis.step``: train.py plots the losses of this
    step just before): images ``gt_img``, ``pred_img`` and ``roi_cm`` (shown as a heat map, see
    :meth:`Visualizer.img`), text ``rpn_cm``.

    Args:
        vis: the dashboard.
        trainer: a ``trainer.FasterRCNNTrainer`` (its model, class names and confusion meters).
        img: ``(3, H', W')`` preprocessed training image (tensor or array).
        bbox: ``(R, 4)`` its ground-truth boxes in pixels of ``img``; ``label``: ``(R,)`` their labels.
    """
    if not (vis.connected or vis.uses_tensorboard):
        return
    from data.dataset import inverse_normalize

    model, names = trainer.faster_rcnn, trainer.class_names
    ori_img = inverse_normalize(tonumpy(img, np.float32), model.normalize)
    vis.img("gt_img", visdom_bbox(ori_img, tonumpy(bbox), tonumpy(label), label_names=names))
    bboxes, labels, scores = model.predict([ori_img], visualize=True)
    vis.img("pred_img", visdom_bbox(ori_img, bboxes[0], labels[0], scores[0], label_names=names))
    vis.text(str(trainer.rpn_cm.value().tolist()), win="rpn_cm")
    vis.img("roi_cm", trainer.roi_cm.value().astype(np.float32)[None])


class VisdomUnavailableWarning(UserWarning):
    """No visdom server answers (at start or any more): the run goes on without it."""


class TensorBoardUnavailableWarning(UserWarning):
    """TensorBoard was asked for but cannot be written (not installed, no ``log_dir``, a write failed): the
    run goes on without it."""


def _summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; ``ImportError`` when the ``tensorboard`` package is
    missing (torch imports it there)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def _tensorboard_image(img) -> np.ndarray:
    """An image for ``SummaryWriter.add_image(s)``: ``(C, H, W)`` or ``(N, C, H, W)`` uint8, ``C`` 1 or 3.

    uint8 passes as is; bool is 0/255; other numbers in ``[0, 1]`` are scaled by 255; numbers outside
    ``[0, 1]`` (a confusion matrix of counts) are divided by their maximum, negatives shown as 0: a heat map.
    A ``(H, W)`` array is one gray image.
    """
    array = _as_array(img)
    if array.ndim == 2:
        array = array[None]  # (H, W) -> (1, H, W)
    if array.ndim not in (3, 4) or array.shape[-3] not in (1, 3):
        raise ValueError(f"an image must be (3, H, W), (1, H, W), (H, W) or (N, 3, H, W), got {array.shape}")
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    low, high = (array.min(), array.max()) if array.size else (0.0, 0.0)
    if low < 0 or high > 1:
        array = np.clip(array, 0, None) / high if high > 0 else np.zeros_like(array)
    return np.round(array * 255).astype(np.uint8)


@functools.cache
def _visdom_client_class() -> type:
    """``visdom.Visdom`` with a timeout on every request and no retries or printing on failures."""
    import visdom

    logger = logging.getLogger("visdom")
    if logger.level == logging.NOTSET:  # it logs a warning for every new session and for socketless use
        logger.setLevel(logging.ERROR)

    class Client(visdom.Visdom):
        timeout = (CONNECT_TIMEOUT, FIRST_READ_TIMEOUT)  # the Visualizer lengthens it once connected

        def _handle_post(self, url, data=None):
            return self.session.post(url, data=data, timeout=self.timeout).text

        def win_exists(self, win, env=None):
            # visdom's prints and returns None when the server is gone; let the ConnectionError through.
            return {"true": True, "false": False}.get(self._win_exists_wrap(win, env))

    return Client


class Visualizer:
    """The original's visdom dashboard, optional; TensorBoard event files, optional; and a history that is
    always written to ``log_dir``.

    Visdom is used when ``use_visdom`` and a server answers at ``server:port``; otherwise (one warning) the
    run goes on and every call is a no-op for visdom. A server that stops answering later costs one warning
    too. Every :meth:`plot` point is also kept in memory and written to ``log_dir`` (when given):

    * ``history.jsonl``: one JSON object per point, ``{"name", "step", "value", "time"}`` (Unix seconds);
    * ``curves.png``: one panel per series, value against step;

    rewritten atomically (``utils.files.atomic_write``) at most every ``flush_every`` seconds from
    :meth:`plot`, and by :meth:`flush`. A ``history.jsonl`` already in ``log_dir`` (a resumed run) is read
    back and its series go on from their last step.

    TensorBoard (``tensorboard``: ``None`` = on when the ``tensorboard`` package is installed; ``True`` and
    not installed, or no ``log_dir``: one :class:`TensorBoardUnavailableWarning`, off) writes event files
    ``events.out.tfevents.*`` into ``log_dir`` through ``torch.utils.tensorboard.SummaryWriter``, created at
    the first write:

    * every :meth:`plot` point as a scalar: same name, step, value and wall time as in ``history.jsonl``;
    * every :meth:`img` as an image, every :meth:`text` and :meth:`log` as text (markdown), at the step given
      or else at :attr:`step`, the largest step plotted so far (0 before any);

    sent to disk by :meth:`flush` (so also every ``flush_every`` seconds from :meth:`plot`, and by
    :meth:`save`), and by :meth:`close` or the end of the process at the latest. Visdom and TensorBoard can
    run together. A resumed run appends a new event file to the same folder; TensorBoard reads all of them
    as one run. ``tensorboard --logdir <save_dir>`` shows every run folder below ``save_dir``.

    Resuming (:meth:`load_state_dict` of a :meth:`state_dict`) discards what was plotted after the
    checkpoint was written (steps above its :attr:`step`, which the resumed run plots again): those
    records are dropped from ``history.jsonl``, and the new event file starts with TensorBoard's purge
    marker (``SummaryWriter(purge_step=step + 1)``), which hides the events of earlier files at steps
    ``>= step + 1``. The event files themselves are never rewritten.

    Args:
        env: visdom environment.
        port, server: where the visdom server listens (``server`` with or without ``http://``).
        log_dir: folder of ``history.jsonl``, ``curves.png`` and the event files (created when needed);
            ``None``: no files.
        use_visdom: ``False`` skips visdom altogether (no warning).
        flush_every: seconds between automatic rewrites of the files.
        tensorboard: ``True``/``False``: TensorBoard on/off; ``None``: on when installed (silently off when
            not, or without ``log_dir``).
        **kwargs: passed to ``visdom.Visdom`` (``base_url``, ``username``, ``password``, ...).

    The Visualizer is a context manager: leaving the ``with`` block calls :meth:`close`.
    """

    def __init__(self, env: str = "default", port: int = 8097, server: str = "http://localhost",
                 log_dir: str | os.PathLike | None = None, use_visdom: bool = True, flush_every: float = 5.0,
                 tensorboard: bool | None = None, **kwargs) -> None:
        self.env = env
        self.port = port
        self.server = server if "://" in server else "http://" + server
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.flush_every = flush_every
        self._vis_kw = kwargs
        self.index: dict[str, int] = {}  # series name -> next step when plot() gets none (the original's)
        self.log_text = ""
        self.history: list[dict] = []
        self.step: int | None = None  # the largest step plotted (read back from history.jsonl too)
        self._dirty = False
        self._last_flush = -math.inf
        if self.log_dir is not None:
            self._read_history()
        self._writer_class = self._tensorboard_writer_class(tensorboard)
        self._writer = None
        self._close_writer = None  # weakref.finalize closing the writer at exit if close() is not called
        self._purge_step: int | None = None
        self.vis = self._connect() if use_visdom else None

    @property
    def connected(self) -> bool:
        """Whether plots are still sent to a visdom server."""
        return self.vis is not None

    @property
    def uses_tensorboard(self) -> bool:
        """Whether plots, images and texts are written to TensorBoard event files in ``log_dir``."""
        return self._writer_class is not None

    # --- tensorboard ------------------------------------------------------------------------------------
    def _tensorboard_writer_class(self, tensorboard: bool | None) -> type | None:
        """``SummaryWriter`` when TensorBoard is on; ``None`` when off (one warning if it was asked for)."""
        if tensorboard is False:
            return None
        if self.log_dir is None:
            if tensorboard:
                warnings.warn("tensorboard=True needs a log_dir for its event files; training goes on "
                              "without TensorBoard", TensorBoardUnavailableWarning, stacklevel=3)
            return None
        try:
            return _summary_writer_class()
        except ImportError as e:
            if tensorboard:
                warnings.warn(f"TensorBoard is not available ({e}): `pip install tensorboard` or pass "
                              "--tensorboard=false; training goes on without it, curves are still written "
                              f"to {os.path.join(self.log_dir, 'curves.png')}",
                              TensorBoardUnavailableWarning, stacklevel=3)
            return None

    def _tensorboard(self, method: str, *args, **kwargs) -> None:
        """``SummaryWriter.<method>(...)`` (the writer is made on the first call); when the event file cannot
        be written: one warning, and TensorBoard is off from then on."""
        if self._writer_class is None:
            return
        try:
            if self._writer is None:
                self._writer = self._writer_class(self.log_dir, purge_step=self._purge_step)
                self._purge_step = None
                self._close_writer = weakref.finalize(self, self._writer.close)
            getattr(self._writer, method)(*args, **kwargs)
        except OSError as e:
            warnings.warn(f"cannot write TensorBoard events to {self.log_dir} ({e}); training goes on "
                          "without TensorBoard", TensorBoardUnavailableWarning, stacklevel=3)
            self._writer_class = None
            self._close_tensorboard()

    def _close_tensorboard(self) -> None:
        """Close the event file (flushing it); a later write opens a new one."""
        writer, self._writer = self._writer, None
        if self._close_writer is not None:
            self._close_writer.detach()
            self._close_writer = None
        if writer is not None:
            try:
                writer.close()
            except OSError as e:
                warnings.warn(f"cannot write TensorBoard events to {self.log_dir} ({e})",
                              TensorBoardUnavailableWarning, stacklevel=3)

    def _tensorboard_step(self, step: int | None) -> int:
        if step is not None:
            return int(step)
        return 0 if self.step is None else self.step

    # --- visdom -----------------------------------------------------------------------------------------
    def _address(self) -> str:
        return f"{self.server}:{self.port}"

    def _connect(self):
        """A visdom client, or ``None`` with one warning when no visdom server answers."""
        hint = (f"start one with `python -m visdom.server -port {self.port}` or pass --use-visdom=false; "
                "training goes on without it")
        if self.log_dir is not None:
            hint += f", curves are still written to {os.path.join(self.log_dir, 'curves.png')}"
        try:
            # A bare TCP check first: fast, and no visdom import or retries when nothing listens.
            socket.create_connection((urlparse(self.server).hostname, self.port), CONNECT_TIMEOUT).close()
            with warnings.catch_warnings():  # visdom 0.2.4 calls the deprecated Logger.warn
                warnings.simplefilter("ignore", DeprecationWarning)
                client = _visdom_client_class()(
                    server=self.server, port=self.port, env=self.env, use_incoming_socket=False,
                    raise_exceptions=True, **self._vis_kw)
            if client.win_exists("") is None:
                raise ConnectionError("it answers, but not as a visdom server")
        except (OSError, ImportError) as e:
            warnings.warn(f"no visdom server at {self._address()} ({e}): {hint}",
                          VisdomUnavailableWarning, stacklevel=3)
            return None
        client.timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
        return client

    def _call(self, method: str, *args, **kwargs):
        """``self.vis.<method>(...)``; on a lost connection: one warning, and visdom is off from then on."""
        if self.vis is None:
            return None
        try:
            return getattr(self.vis, method)(*args, **kwargs)
        except OSError as e:
            warnings.warn(f"visdom server at {self._address()} stopped answering ({e}); no more plots are "
                          "sent to it, training goes on", VisdomUnavailableWarning, stacklevel=3)
            self.vis = None
            return None

    # --- the original's interface -----------------------------------------------------------------------
    def plot(self, name: str, y, step: int | None = None, **kwargs) -> None:
        """Add the point ``(step, y)`` to the curve ``name`` (window ``name``).

        Args:
            y: a number (or a one-element array/tensor).
            step: x of the point; default: the number of points plotted before (the original's counter).
            **kwargs: passed to ``visdom.Visdom.line``.
        """
        y = float(y)
        x = self.index.get(name, 0) if step is None else int(step)
        self._call("line", Y=np.array([y]), X=np.array([x]), win=name, opts={"title": name},
                   update="append" if name in self.index else None, **kwargs)
        self.index[name] = x + 1
        self.step = x if self.step is None else max(self.step, x)
        record = {"name": name, "step": x, "value": y, "time": round(time.time(), 3)}
        self.history.append(record)
        self._tensorboard("add_scalar", name, y, x, walltime=record["time"])
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def plot_many(self, d: Mapping[str, float], step: int | None = None) -> None:
        """:meth:`plot` each ``{name: value}`` (``None`` values are skipped)."""
        for name, value in d.items():
            if value is not None:
                self.plot(name, value, step=step)

    def img(self, name: str, img, step: int | None = None, **kwargs) -> None:
        """Show an image in window ``name``: ``(3, H, W)`` or ``(N, 3, H, W)`` float in ``[0, 1]`` or uint8
        in ``[0, 255]`` (numpy array or tensor); ``**kwargs`` go to ``visdom.Visdom.images``.

        TensorBoard gets it as image ``name`` at ``step`` (default :attr:`step`, the largest step plotted),
        as uint8: floats in ``[0, 1]`` times 255; other values (a confusion matrix of counts) divided by
        their maximum. ``(1, H, W)`` and ``(H, W)`` are gray; ``(N, 3, H, W)`` is one entry of ``N`` images.
        """
        if self.vis is not None:
            self._call("images", _as_array(img), win=name, opts={"title": name}, **kwargs)
        if self.uses_tensorboard:
            image = _tensorboard_image(img)
            method = "add_images" if image.ndim == 4 else "add_image"
            self._tensorboard(method, name, image, self._tensorboard_step(step),
                              dataformats="NCHW" if image.ndim == 4 else "CHW")

    def text(self, text, win: str = "text", step: int | None = None) -> None:
        """Show ``text`` (anything; shown as ``str(text)``) in window ``win``; TensorBoard: text ``win`` at
        ``step`` (default :attr:`step`)."""
        self._call("text", str(text), win=win)
        self._tensorboard("add_text", win, str(text), self._tensorboard_step(step))

    def log(self, info, win: str = "log_text", step: int | None = None) -> None:
        """Append ``[mmdd_HHMMSS] info`` to the log shown in window ``win``; TensorBoard gets that line
        alone as text ``win`` at ``step`` (default :attr:`step`)."""
        line = f"[{time.strftime('%m%d_%H%M%S')}] {info}"
        self.log_text += f"{line} <br>"
        self._call("text", self.log_text, win=win)
        self._tensorboard("add_text", win, line, self._tensorboard_step(step))

    def save(self) -> None:
        """Persist the env on the visdom server (its ``env_path``) and flush the files; never raises for a
        missing server."""
        self._call("save", [self.env])
        self.flush()

    def close(self) -> None:
        """Flush the files and close the TensorBoard event file (a later write opens a new one). Calling it
        again does nothing more."""
        self.flush()
        self._close_tensorboard()

    def __enter__(self) -> Visualizer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def state_dict(self) -> dict:
        """Plain values to store in a checkpoint (``vis_info``); ``step`` is the largest step plotted."""
        return {"index": dict(self.index), "vis_kw": {"server": self.server, "port": self.port},
                "log_text": self.log_text, "env": self.env, "step": self.step}

    def load_state_dict(self, d: Mapping) -> Visualizer:
        """Restore the counters, the log and the env of :meth:`state_dict` (also the original's
        ``vis_info``). The connection settings (``vis_kw``) are not taken: this run's options decide where
        plots go.

        With a ``step`` (from :meth:`state_dict`; the original's ``vis_info`` has none), the points plotted
        after the checkpoint are discarded: history records with a larger step are dropped, and TensorBoard
        hides the events of earlier event files from ``step + 1`` on (its purge marker, written at the start
        of the next event file).
        """
        self.index = {str(k): int(v) for k, v in d.get("index", {}).items()}
        self.log_text = str(d.get("log_text", ""))
        self.env = str(d.get("env", self.env))
        if self.vis is not None:
            self.vis.env = self.env
        if d.get("step") is not None:
            self._discard_after(int(d["step"]))
        return self

    def _discard_after(self, step: int) -> None:
        """Forget the points plotted at steps above ``step`` (they belong to a discarded continuation)."""
        kept = [record for record in self.history if record["step"] <= step]
        if len(kept) != len(self.history):
            self.history = kept
            self._dirty = True
        self.step = step
        if self.uses_tensorboard:
            self._close_tensorboard()  # the next event file starts with the purge marker
            self._purge_step = step + 1

    # --- files ------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send the TensorBoard events to disk; rewrite ``history.jsonl`` and ``curves.png`` in ``log_dir`` if
        points came since the last flush."""
        self._last_flush = time.monotonic()
        if self._writer is not None:
            self._tensorboard("flush")
        if self.log_dir is None or not self._dirty:
            return
        os.makedirs(self.log_dir, exist_ok=True)
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        atomic_write(os.path.join(self.log_dir, "history.jsonl"), lambda f: f.write(lines.encode()))
        fig = _curves_figure(self.history)
        atomic_write(os.path.join(self.log_dir, "curves.png"), lambda f: fig.savefig(f, format="png"))
        self._dirty = False

    def _read_history(self) -> None:
        """Load ``log_dir/history.jsonl`` if present; unreadable lines are skipped with one warning."""
        path = os.path.join(self.log_dir, "history.jsonl")
        if not os.path.exists(path):
            return
        n_bad = 0
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    record = {"name": str(record["name"]), "step": int(record["step"]),
                              "value": float(record["value"]), "time": float(record.get("time", 0.0))}
                except (ValueError, TypeError, KeyError):
                    n_bad += 1
                    continue
                self.history.append(record)
                self.index[record["name"]] = max(self.index.get(record["name"], 0), record["step"] + 1)
                self.step = record["step"] if self.step is None else max(self.step, record["step"])
        if n_bad:
            warnings.warn(f"{path}: skipped {n_bad} unreadable line(s)", stacklevel=3)


def _curves_figure(history: Sequence[dict]) -> Figure:
    """One panel per series of ``history`` (in order of first appearance): value against step."""
    series: dict[str, tuple[list, list]] = {}
    for record in history:
        steps, values = series.setdefault(record["name"], ([], []))
        steps.append(record["step"])
        values.append(record["value"])
    n_col = min(len(series), 3)
    n_row = math.ceil(len(series) / n_col)
    fig = Figure(figsize=(4 * n_col, 3 * n_row), dpi=80, layout="tight")
    FigureCanvasAgg(fig)
    for i, (name, (steps, values)) in enumerate(series.items()):
        ax = fig.add_subplot(n_row, n_col, i + 1)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    return fig
