"""The memory format the extractor runs in on the CPU, chosen per machine and phase from a measurement.

oneDNN's convolutions are fast in ``channels_last`` on some CPUs and in the default ``contiguous`` format on
others, and the answer differs between inference and training:

* an Intel CPU with AVX-512: ``channels_last`` about a quarter faster for VGG16 inference;
* an AMD EPYC with AVX2 only: training the other way round (VGG16 conv1..conv5 forward + backward at 600x800,
  9.6 s ``channels_last`` against 6.8 s ``contiguous``: backward 7.9 vs 4.7 s);
* an AMD EPYC Zen 5 (``cpu family`` 26, AVX-512, AVX512_BF16): ``channels_last`` (VGG16 conv3, 493 against
  343 GFLOP/s).

So :func:`choose_memory_format` measures instead of assuming: on the CPU it times the model's extractor in
both formats (VGG16 at 600x800 on 2 cores: about 20 s for inference, a minute for training; the toy model at
224x224: a fraction of a second), picks the faster, and
caches the answer in ``~/.cache/simple-faster-rcnn/memory_format.json`` (``$XDG_CACHE_HOME`` when set) under
a key of the machine (:func:`cpu_signature`: CPU model and flags, torch version, thread count), the
extractor's structure, the phase and the image size, so the probe runs once per machine and setting.

Usage (``train.py``, ``bench/``)::

    fmt = choose_memory_format(model, "training", (600, 800), setting=cfg.memory_format)
    model.to(memory_format=fmt)  # FasterRCNN.forward then feeds the extractor in that format

:func:`choose_memory_format` only returns the format: the model is left exactly as it was.
"""

import copy
import hashlib
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from utils.amp import autocast
from utils.files import atomic_write

__all__ = ["CACHE_FILE", "ONEDNN_CACHE_CAPACITY", "PHASES", "SETTINGS", "choose_memory_format",
           "cpu_signature", "default_cache_dir", "keep_onednn_primitives"]

CACHE_FILE = "memory_format.json"
PHASES = ("inference", "training")
SETTINGS = ("auto", "channels_last", "contiguous")
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# /proc/cpuinfo flags that decide which oneDNN kernels run (x86 ``flags``, Arm ``Features``)
_RELEVANT_FLAGS = frozenset((
    "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_bf16", "amx_tile", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm",
))
# 2: the CPU convolutions' kernels changed (model/utils/cpu_conv.py: Winograd on AMD CPUs too), so the choices
# an older release measured are measured again (a cache of an older version is dropped without a warning)
_CACHE_VERSION = 2
# oneDNN primitives (compiled kernels) kept per process by keep_onednn_primitives (oneDNN's default: 1024)
ONEDNN_CACHE_CAPACITY = 65536


def keep_onednn_primitives(capacity: int = ONEDNN_CACHE_CAPACITY) -> bool:
    """Let oneDNN keep the kernels of ``capacity`` primitives; call before the process's
    first convolution.

    oneDNN compiles a primitive (a convolution's forward, each of its two backward passes, the reorders
    between memory formats) for every input shape, and keeps the most recent ones in an LRU cache (1024 by
    default, as its documentation says; a few thousand overflow it in our tests). Detection keeps
    each image's aspect ratio, so every image size is a new shape: the toy set's 500 training images come in
    a few hundred sizes, times 16 convolutions, times three or four primitives each, and the default cache
    evicts kernels before their size comes back. On an Intel Xeon with AVX-512, in a second pass over the
    same 250 images, the toy model's training steps compiled 1506 of their 15500 primitives again, for
    4.5 ms a step by oneDNN's own timer (``ONEDNN_VERBOSE``), and took 64.0 ms a step against 55.7 ms with
    room for all (none compiled again). The kernels are the same, so the results are too, bit for bit. The
    cache holds the kernels, not the buffers they work in (PyTorch hands oneDNN its scratch memory), so the
    larger cache costs little memory.

    oneDNN sizes its cache from ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` when it creates its first primitive;
    this sets that variable, unless the user did, and is a no-op once a primitive exists.

    Returns:
        Whether the variable now holds ``capacity`` (``False``: the user's value stays).
    """
    value = os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
    return value == str(capacity)


def release_mkl_buffers() -> bool:
    """Let MKL free the packing buffers of its matrix products instead of pooling them; call before the
    process's first matrix product.

    MKL's memory manager keeps the buffers of every product it ran for reuse. The Winograd convolutions
    (``model/utils/cpu_conv.py``) run thousands of batched products of many shapes per image, and the pool
    kept 50-80 MB more after the first image, which the next image's first convolution then added to its own
    peak: VGG16's peak RSS in a fresh process (two 600x800 images, Intel Xeon, 2 threads) was 1812 MiB with
    the pool, 1766 MiB without (1778-1791 MiB with the stock convolutions, torchvision's 1790-1816 either
    way); the time of a training step did not change beyond the machine's noise. The results are the same:
    only where the buffers live changes.

    MKL reads ``MKL_DISABLE_FAST_MM`` when it first allocates; this sets it to 1 unless the user set it.

    Returns:
        Whether the variable now holds ``'1'`` (``False``: the user's value stays).
    """
    return os.environ.setdefault("MKL_DISABLE_FAST_MM", "1") == "1"


def cpu_signature(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """What identifies this machine for the choice: the CPU, the kernels torch can use, the thread count.

    Read from the first processor of ``cpuinfo``; a missing file or field gives ``None`` (or no flags), never
    an error (macOS, Windows, containers that hide fields).

    Returns:
        ``{'model_name', 'vendor', 'cpu_family', 'model', 'flags', 'cpu_capability', 'torch', 'threads'}``:
        strings (or ``None``) from ``cpuinfo`` (``model name``, ``vendor_id``, ``cpu family``, ``model``),
        the sorted relevant flags (AVX2, AVX-512, AVX512_BF16, AMX..., Arm's SVE/BF16), torch's CPU
        capability (``'AVX512'``...), ``torch.__version__`` and ``torch.get_num_threads()``.
    """
    fields = _first_processor(cpuinfo)
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {
        "model_name": fields.get("model name") or fields.get("Hardware") or platform.processor() or None,
        "vendor": fields.get("vendor_id") or fields.get("CPU implementer"),
        "cpu_family": fields.get("cpu family"),
        "model": fields.get("model") or fields.get("CPU part"),
        "flags": sorted(set(flags) & _RELEVANT_FLAGS),
        "cpu_capability": capability,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _first_processor(cpuinfo: str | os.PathLike) -> dict[str, str]:
    """``key: value`` lines of ``cpuinfo`` up to the first blank line after a field ({} if unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/simple-faster-rcnn``, else ``~/.cache/simple-faster-rcnn``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "simple-faster-rcnn"


def choose_memory_format(
    model: nn.Module,
    phase: str,
    image_size: tuple[int, int],
    setting: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], object] | None = print,
    reps: int = 3,
    amp: bool = False,
) -> torch.memory_format:
    """The memory format to run ``model``'s extractor in: forced by ``setting``, or measured on the CPU.

    ``'auto'`` on the CPU: the extractor (``model.extractor``; ``model`` itself when it has none) runs on a
    random ``(1, 3, H, W)`` input in both formats, interleaved, one warm-up and ``reps`` timed repetitions
    each, and the format of the smaller best time wins (``contiguous`` on a tie). ``'inference'`` times its
    forward under ``torch.no_grad``; ``'training'`` its forward in training mode plus the backward
    (``torch.autograd.grad`` of a ones upstream gradient) w.r.t. its trainable parameters, the input needing
    no gradient, as in a training step (VGG16: conv1/conv2 frozen, no input gradient for conv3_1). With
    ``amp`` the probe runs under ``--amp``'s autocast (:func:`utils.amp.autocast`: bfloat16 on the CPU), the
    kernels the run will use: oneDNN's bfloat16 convolutions favour a format of their own (on an AMD EPYC
    Zen 4, the toy model's training probe: channels-last in float32, 28 against 30 ms, contiguous under
    autocast, 13 against 16 ms), and our float32 Winograd layers do not run under autocast.

    The probe runs on copies of the extractor, one per format, under ``torch.random.fork_rng``: ``model``'s
    parameters (values, memory format), their ``.grad``, its train/eval mode and the global RNG state are
    unchanged. This function only returns the format; apply it with ``model.to(memory_format=fmt)``.

    The answer is cached in ``cache_dir/memory_format.json`` (default :func:`default_cache_dir`) under a key
    of :func:`cpu_signature` (CPU model and flags, torch version, threads), ``model.arch['name']``, a hash of
    the extractor's structure and trainable parameters, ``phase``, ``amp`` and ``image_size``: another
    machine, thread count, model, phase, precision or size probes again. An unreadable or corrupt cache file
    is ignored with a warning and rewritten; the file is replaced atomically (temp file + rename), so a
    reader never sees half of one. Two processes probing at the same time may each write; the last one's
    entries win, the other's are measured again next time.

    On CUDA (and any other non-CPU device) the answer is ``contiguous`` unless forced, without a probe:
    our CuPy RoI pooling kernels read contiguous NCHW maps (a ``channels_last`` map is copied, forward and
    backward), cuDNN picks its own internal layouts for the fp32 convolutions this model trains with (NHWC
    pays off mainly for fp16/bf16 tensor-core kernels), and nobody has measured a gain on a GPU for this
    model yet: force ``'channels_last'`` to try it.

    Args:
        model: a :class:`~model.faster_rcnn.FasterRCNN` (or any module with an ``extractor``), on its device.
        phase: ``'inference'`` or ``'training'``.
        image_size: ``(H, W)`` of the preprocessed images (600x800 for a VOC landscape photo).
        setting: ``'auto'``, ``'channels_last'`` or ``'contiguous'`` (the last two force it, no probe).
        cache_dir: folder of the cache file; ``None``: :func:`default_cache_dir`.
        log: called with one line saying the choice and the measured (or cached) times; ``None``: silent.
        reps: timed repetitions per format of the probe.
        amp: measure under ``--amp``'s autocast, as the run will compute.

    Returns:
        ``torch.channels_last`` or ``torch.contiguous_format``.

    Raises:
        ValueError: an unknown ``phase`` or ``setting``, or a bad ``image_size``.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if setting not in SETTINGS:
        raise ValueError(f"memory format setting must be one of {SETTINGS}, got {setting!r}")
    height, width = (int(v) for v in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be two positive ints (H, W), got {image_size!r}")
    log = log or (lambda line: None)
    if setting != "auto":
        log(f"memory format for {phase}: {setting} (forced)")
        return _FORMATS[setting]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        log(f"memory format for {phase} on {device.type}: contiguous (no probe off the CPU; force "
            "channels_last to try it)")
        return torch.contiguous_format

    signature = cpu_signature()
    key_fields = _cache_key_fields(model, phase, (height, width), signature, amp)
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / CACHE_FILE
    entries = _read_cache(path)
    entry = entries.get(key)
    where = (f"memory format for {phase}{' under --amp' if amp else ''} ({height}x{width}, "
             f"{signature['threads']} threads, "
             f"{signature['model_name'] or 'unknown CPU'})")
    if _valid_entry(entry):
        log(f"{where}: {entry['choice']} (cached in {path}: {_times_text(entry['times'])})")
        return _FORMATS[entry["choice"]]

    times = _probe(model, phase, (height, width), reps, amp)
    choice = min(sorted(times), key=lambda name: times[name])  # sorted: 'contiguous' wins a tie
    entries[key] = {"choice": choice, "times": times, "reps": reps, "key": key_fields,
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_cache(path, entries)
    steps = "forward" if phase == "inference" else "forward + backward"
    log(f"{where}: {choice} (measured, extractor {steps}, best of {reps}: {_times_text(times)})")
    return _FORMATS[choice]


def _times_text(times: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in sorted(times.items()))


def _extractor(model: nn.Module) -> nn.Module:
    return getattr(model, "extractor", model)


def _cache_key_fields(model: nn.Module, phase: str, image_size: tuple[int, int], signature: dict,
                      amp: bool = False) -> dict:
    """The fields the cached choice depends on (JSON-able)."""
    extractor = _extractor(model)
    trainable = [name for name, p in extractor.named_parameters() if p.requires_grad]
    kernels = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for m in extractor.modules()})
    # layers, their settings, what is frozen, and their classes (model.utils.cpu_conv.Conv2d or nn.Conv2d)
    structure = repr(extractor) + "\n" + ",".join(trainable) + "\n" + ",".join(kernels)
    arch = getattr(model, "arch", None)
    return {
        "cpu": signature,
        "arch": arch.get("name") if isinstance(arch, dict) else type(model).__name__,
        "extractor": hashlib.sha256(structure.encode()).hexdigest()[:16],
        "phase": phase,
        "image_size": list(image_size),
        "amp": bool(amp),
    }


def _time_probe(step: Callable[[], object], memory_format: torch.memory_format) -> float:
    """Seconds of one ``step()`` (the extractor in ``memory_format``); a separate function so that tests can
    replace the clock."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _probe(model: nn.Module, phase: str, image_size: tuple[int, int], reps: int,
           amp: bool = False) -> dict[str, float]:
    """Best seconds of the extractor's probe step in each format (see :func:`choose_memory_format`)."""
    training = phase == "training"
    extractor = _extractor(model)
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    steps = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = torch.rand((1, 3, *image_size), device=device)
        for name, memory_format in _FORMATS.items():
            module = copy.deepcopy(extractor).to(memory_format=memory_format).train(training)
            steps[name] = _probe_step(module, image.contiguous(memory_format=memory_format), training, amp)
        best = {name: math.inf for name in steps}
        for step in steps.values():  # warm-up: oneDNN primitive creation, allocator
            step()
        for rep in range(reps):
            names = sorted(steps) if rep % 2 == 0 else sorted(steps, reverse=True)  # interleaved, both orders
            for name in names:
                best[name] = min(best[name], _time_probe(steps[name], _FORMATS[name]))
    return best


def _probe_step(module: nn.Module, image: torch.Tensor, training: bool,
                amp: bool = False) -> Callable[[], None]:
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> None:
        if not training:
            with torch.no_grad(), autocast(image.device, amp):
                module(image)
            return
        with torch.enable_grad():
            with autocast(image.device, amp):
                out = module(image)
            if params and out.requires_grad:
                torch.autograd.grad(out, params, torch.ones_like(out))

    return step


def _read_cache(path: Path) -> dict:
    """The cache's entries; ``{}`` (with a warning) when the file is unreadable or not ours."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: cannot read the memory-format cache ({e}); probing again", stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        version = data.get("version") if isinstance(data, dict) else None
        if isinstance(version, int) and 1 <= version < _CACHE_VERSION:
            return {}  # an older release's measurements, of other kernels: probed again, then rewritten
        if version != _CACHE_VERSION:
            raise ValueError(f"not a version-{_CACHE_VERSION} memory-format cache")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
    except (ValueError, KeyError) as e:
        warnings.warn(f"{path}: corrupt memory-format cache ignored ({e}); it will be rewritten",
                      stacklevel=3)
        return {}
    return entries


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict) or entry.get("choice") not in _FORMATS:
        return False
    times = entry.get("times")
    return isinstance(times, dict) and all(isinstance(v, (int, float)) for v in times.values())


def _write_cache(path: Path, entries: dict) -> None:
    """Replace the cache file atomically; a failure (read-only home...) only warns."""
    data = json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True) + "\n"
    try:
        atomic_write(path, lambda f: f.write(data.encode()))
    except OSError as e:
        warnings.warn(f"{path}: cannot write the memory-format cache ({e}); the probe will run again next "
                      "time", stacklevel=3)
