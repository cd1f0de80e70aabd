"""Atomic file writes: the one writer behind checkpoints, ``history.jsonl``, ``curves.png`` and results.

:func:`atomic_write` writes to a temporary file in the destination's folder, flushes it to disk and renames
it over the destination, so a crash or a kill at any moment leaves either the old file or the new one, never
half of one. The temporary file is named ``.<name>.<pid>.<random>.tmp``: no reader looks at such names, and
:func:`remove_stale_temp_files` deletes those whose process is gone (a run calls it on its folder when it
starts).

The file gets the permissions a plain ``open(path, 'w')`` would give it under the user's umask (0644 by
default), not the 0600 of ``tempfile.mkstemp``: in a lab, colleagues read each other's checkpoints.
"""

import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["SAVE_PAUSE_ENV", "atomic_write", "remove_stale_temp_files"]

# Test-only: seconds atomic_write waits with the complete temp file before renaming it, so that a test can
# kill the process inside the write window (tests/test_robustness.py). Unset in normal use.
SAVE_PAUSE_ENV = "SIMPLE_FASTER_RCNN_TEST_SAVE_PAUSE"
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> str:
    """Call ``write(f)`` on a binary temp file beside ``path``, then move it onto ``path`` atomically.

    If anything fails (``write`` raises, a full disk, a signal), the temporary file is removed and an existing
    file at ``path`` is left untouched; after a kill, only the temporary file may remain (see
    :func:`remove_stale_temp_files`). The folder is created when missing.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{os.getpid()}.",
                                    suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(SAVE_PAUSE_ENV):
            time.sleep(float(os.environ[SAVE_PAUSE_ENV]))
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_folder(folder)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Delete the temp files that killed :func:`atomic_write` calls left in ``folder``.

    Only files named as :func:`atomic_write` names them, by a process that no longer runs on this machine,
    are removed (a write in progress in another process is left alone). A missing folder is fine.

    Returns:
        The paths removed.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in os.listdir(folder):
        match = _TEMP_NAME.fullmatch(name)
        if match and not _process_exists(int(match["pid"])):
            path = os.path.join(folder, name)
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``); elsewhere
    by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
