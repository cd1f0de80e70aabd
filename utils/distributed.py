"""Several processes under torchrun: who this process is, and the few collectives training needs.

``torchrun --nproc_per_node=K train.py train ...`` starts K processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment; :func:`init_distributed` joins them into one process group (gloo on the
CPU, NCCL on CUDA with one GPU per process). Every function here also works unchanged in a plain
``python train.py`` (world size 1: no group, nothing sent), as detectron2's ``comm`` and torchvision's
references do, so the training code has no ``if distributed:`` branches.

Failures. A process that dies ends the job: torchrun stops the others and names the failed rank. A process
that hangs leaves the others waiting in a collective until the group's timeout (``--dist-timeout``); then
:func:`describe_failure` names the ranks that fell behind. Every process counts the synchronisation points
it reaches (each collective here, and each gradient bucket DDP reduces: :func:`ddp_progress_hook`), and a
background thread writes the count to the group's store every half second; a rank stuck anywhere leaves a
count below that of the ranks waiting for it.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "cleanup",
    "describe_failure",
    "ddp_progress_hook",
    "gather_flags",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
]

# This process's count of synchronisation points reached (see the module docstring), and its reporter: the
# thread and the event that stops it.
_progress = {"count": 0}
_heartbeat: dict = {"thread": None, "stop": None}
_HEARTBEAT_SECONDS = 0.5
_HEARTBEAT_JOIN_SECONDS = 5.0


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join torchrun's process group when there is one; returns the device of this process.

    Args:
        device: the device the options name (``utils.config.resolve_device``); under torchrun a CUDA device
            becomes ``cuda:LOCAL_RANK`` (one GPU per process).
        timeout_s: how long a collective waits for the other processes before failing.

    Returns:
        ``device``, or this process's GPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    # torchrun's store outlives a restarted job (--max-restarts): each attempt keeps its keys apart, or the
    # new processes would read the addresses of the old ones
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    _start_heartbeat()
    return device


def cleanup() -> None:
    """Stop the heartbeat and leave the process group (a no-op without one).

    The heartbeat thread is stopped and joined first: left running, it may be inside a store call when the
    interpreter shuts down, and a native thread cut off there can abort the process at exit (a rank that
    had finished its work then ends with SIGABRT, and torchrun reports the whole job as failed).
    """
    _stop_heartbeat()
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process writes files and prints progress: rank 0 of the group, or of torchrun's
    environment once the group is gone."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (a no-op alone)."""
    if dist.is_initialized():
        _reached()
        dist.barrier()


def gather_flags(flag: bool, device: torch.device | str = "cpu") -> list[bool]:
    """Every process's ``flag``, in rank order (one ``all_reduce`` of a ``(world_size,)`` tensor).

    Args:
        device: where the tensor goes (the process's GPU with NCCL).
    """
    if not dist.is_initialized():
        return [bool(flag)]
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = float(flag)
    _reached()
    dist.all_reduce(flags)
    return [bool(v) for v in flags.tolist()]


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    _reached()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Process ``src``'s ``obj`` (picklable), on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    _reached()
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _store():
    """The process group's key-value store (torchrun's), or ``None``."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError):
        return None


def _reached() -> None:
    """Count a synchronisation point of this process."""
    _progress["count"] += 1


def ddp_progress_hook(state, bucket):
    """A ``DistributedDataParallel`` communication hook: count the point (a gradient bucket), then the
    default all-reduce of the bucket (``register_comm_hook(None, ddp_progress_hook)``)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    _reached()
    return allreduce_hook(state, bucket)


def _start_heartbeat() -> None:
    """Report this process's count to the group's store every half second, from a daemon thread (it keeps
    reporting while the main thread waits in a collective)."""
    store, key = _store(), f"heartbeat/{get_rank()}"
    if store is None:
        return

    stop = threading.Event()

    def report() -> None:
        while not stop.is_set():
            try:
                store.set(key, f"{_progress['count']} {time.time():.3f}")
            except RuntimeError:  # the store is gone: the job is ending
                return
            stop.wait(_HEARTBEAT_SECONDS)

    thread = threading.Thread(target=report, name="heartbeat", daemon=True)
    _heartbeat.update(thread=thread, stop=stop)
    thread.start()


def _stop_heartbeat() -> None:
    """Stop the heartbeat thread and wait for it (at most ``_HEARTBEAT_JOIN_SECONDS``: a store call that
    hangs must not hang the exit)."""
    thread, stop = _heartbeat["thread"], _heartbeat["stop"]
    _heartbeat.update(thread=None, stop=None)
    if thread is not None:
        stop.set()
        thread.join(_HEARTBEAT_JOIN_SECONDS)


def describe_failure(error: BaseException, timeout_s: float | None = None) -> str:
    """A message for a failed collective: what failed, every rank's last reported count of synchronisation
    points, and the ranks behind the others (the ones that died or hang)."""
    message = f"rank {get_rank()}: a collective operation with the other processes failed ({error})"
    store = _store()
    if store is None:
        return message
    if "by peer" in str(error):  # a process died: torchrun names it
        return f"{message}; a process died (torchrun's report below names it)"
    beats = {}
    for rank in range(get_world_size()):
        key = f"heartbeat/{rank}"
        try:
            if store.check([key]):
                count, stamp = store.get(key).decode().split()
                beats[rank] = (int(count), float(stamp))
        except (RuntimeError, ValueError):
            continue
    if not beats:
        return message
    latest = max(count for count, _ in beats.values())
    behind = sorted(set(range(get_world_size())) - {r for r, (c, _) in beats.items() if c == latest})
    now = time.time()
    progress = "; ".join(f"rank {r}: {c} (reported {now - t:.0f} s ago)"
                         for r, (c, t) in sorted(beats.items()))
    waited = f" after {timeout_s:.0f} s" if timeout_s and "imed out" in str(error) else ""
    if behind:
        return (f"{message}{waited}: rank(s) {', '.join(map(str, behind))} stopped answering (died or hang); "
                f"synchronisation points reached: {progress}")
    return f"{message}{waited}; synchronisation points reached: {progress}"
