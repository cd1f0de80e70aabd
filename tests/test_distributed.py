"""Several processes with torchrun + DistributedDataParallel on the CPU (gloo): 2 processes of one thread
each, started here on 127.0.0.1, every wait bounded by a timeout.

Parameters identical on every rank after each step; 2 ranks x batch 1 = 1 process x batch 2; sharded
evaluation = one process; a 2-"machine" run; a dead or hung rank ends the job naming it; a non-finite loss on
one rank stops all before the step; SIGTERM saves once and resumes exactly; torchrun --max-restarts resumes
from last.pth.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from data.toy_dataset import TOY_LABEL_NAMES, generate_toy_voc
from utils.checkpoint import load_checkpoint
from utils.config import TOY_PRESET

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 8, 6
TIMEOUT = 240  # seconds any one job may take before the test fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def torchrun_args(nproc: int = 2, port: int | None = None, extra=()) -> list:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={port or free_port()}", *extra]


def run(args, cwd, timeout=TIMEOUT, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env(**extra_env))


@pytest.fixture(scope="module")
def same_size_voc(tmp_path_factory):
    """A toy tree whose images all have one size: batches are never padded, so a batch of two is two images
    alone."""
    root = tmp_path_factory.mktemp("ddp") / "voc"
    return generate_toy_voc(root, n_trainval=N_TRAIN, n_test=N_TEST, seed=5, min_side=128, max_side=128)


def options(voc, save_dir, run_name, **overrides) -> list:
    values = {**TOY_PRESET, "data": "voc", "voc_data_dir": str(voc), "label_names": TOY_LABEL_NAMES,
              "save_dir": str(save_dir), "run_name": run_name, "epoch": 2, "lr_decay_epoch": 0,
              "min_size": 96, "max_size": 128, "n_train_pre_nms": 600, "n_train_post_nms": 100,
              "n_test_pre_nms": 300, "n_test_post_nms": 50, "use_visdom": False, "tensorboard": False,
              "seed": 0, "plot_every": 1000, "dist_timeout": 60,
              # one memory format for every run compared: the probe may choose differently per thread count
              "memory_format": "contiguous", **overrides}
    flags = []
    for key, value in values.items():
        value = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        flags.append(f"--{key.replace('_', '-')}={value}")
    return flags


def train_py(*flags) -> list:
    return [os.path.join(REPO, "train.py"), *flags]


def weights(path) -> dict:
    return load_checkpoint(path)["model"]


# --- the worker: parameters step by step ------------------------------------------------------------------
def test_every_rank_holds_the_same_parameters_after_every_step(tmp_path):
    out = tmp_path / "out.json"
    proc = run(torchrun_args() + [os.path.join(REPO, "tests", "distributed_worker.py"), str(out), "4"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checksums = json.load(open(out))["checksums"]
    assert len(checksums) == 5  # the start (after DDP's broadcast of rank 0's weights) and 4 steps
    for step in checksums:
        assert step[0] == step[1]
    assert checksums[0] != checksums[-1]  # and they did train


def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_step(tmp_path):
    out = tmp_path / "out.json"
    args = torchrun_args() + [os.path.join(REPO, "tests", "distributed_worker.py"), str(out), "4", "1", "2"]
    proc = run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    checksums, errors = result["checksums"], result["errors"]
    assert len(checksums) == 4  # start, steps 0 and 1, then the stopped step 2
    assert checksums[-1] == checksums[-2] and checksums[-1][0] == checksums[-1][1]  # no rank stepped
    assert set(errors) == {"0", "1"}
    assert "non-finite loss on rank(s) [1]" in errors["0"] and "non-finite loss: " in errors["1"]


# --- train.py under torchrun --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks_and_one_process(same_size_voc, tmp_path_factory):
    """The same seeded run as 2 processes x 1 image and as 1 process x 2 images (each image's flip and
    samples from its own generator), and its outputs."""
    work = tmp_path_factory.mktemp("runs")
    ddp = run(torchrun_args() + train_py("train", *options(same_size_voc, work, "ddp", batch_size=1)), work)
    single = run([sys.executable] + train_py("train", *options(same_size_voc, work, "single", batch_size=2)),
                 work)
    return work, ddp, single


def test_two_ranks_of_one_image_train_as_one_process_of_two(two_ranks_and_one_process):
    work, ddp, single = two_ranks_and_one_process
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_checkpoint(work / "ddp" / "last.pth"), load_checkpoint(work / "single" / "last.pth")
    assert a["other_info"]["iteration"] == b["other_info"]["iteration"] == 2 * N_TRAIN // 2
    assert a["other_info"]["lr"] == b["other_info"]["lr"]  # --scale-lr: the same images per step
    # within float rounding accumulated over the run's steps: the two sum the same gradients in another
    # order and on other thread counts (largest difference seen 1.1e-5, on an AMD EPYC Zen 4); a wrong
    # averaging or lr would move the weights by ~1e-3
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-4, atol=5e-5, msg=key)
    # the same losses along the way (history.jsonl: the end-of-epoch means are plotted at every epoch)
    history = [[json.loads(line) for line in open(work / name / "history.jsonl")]
               for name in ("ddp", "single")]
    maps = [[r["value"] for r in h if r["name"] == "test_map"] for h in history]
    assert len(maps[0]) == 2 and maps[0] == pytest.approx(maps[1], abs=1e-3)
    # rank 0 alone wrote the run folder and printed the progress
    assert sorted(os.listdir(work / "ddp")) == ["best.pth", "curves.png", "history.jsonl", "last.pth"]
    assert ddp.stdout.count("best test mAP") == 1


def test_sharded_evaluation_equals_one_process(two_ranks_and_one_process, same_size_voc):
    work, ddp, _ = two_ranks_and_one_process
    ckpt = work / "ddp" / "best.pth"
    flags = ["eval", f"--load-path={ckpt}", f"--voc-data-dir={same_size_voc}"]
    sharded = run(torchrun_args() + train_py(*flags, "--test-batch-size=2"), work)
    alone = run([sys.executable] + train_py(*flags), work)
    assert sharded.returncode == 0 and alone.returncode == 0, sharded.stderr[-3000:] + alone.stderr[-3000:]
    found = [re.findall(r"mAP: (\d\.\d+) \((\d+) test images", p.stdout) for p in (sharded, alone)]
    assert found[0] == found[1] and len(found[0]) == 1 and found[0][0][1] == str(N_TEST)
    assert sharded.stdout.count("mAP:") == 1  # one table, from rank 0


def test_two_machines_on_localhost_train_together(same_size_voc, tmp_path):
    port = free_port()
    rdzv = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
            "--rdzv_id=two_machines"]
    flags = train_py("train", *options(same_size_voc, tmp_path, "", epoch=1))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", *rdzv,
                               f"--node_rank={node}", *flags], cwd=tmp_path, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    # the run folder is named after the rendezvous id, the same on both machines
    info = load_checkpoint(tmp_path / "toy_voc_two_machines" / "last.pth")["other_info"]
    assert info["epoch"] == 1 and info["iteration"] == N_TRAIN // 2


# --- faults -------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _wait_for(condition, proc, timeout=TIMEOUT, poll=0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _worker_ranks(agent_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the children of ``agent_pid`` whose environment names their rank (a child just
    forked, not yet running the worker, still has torchrun's environment, without ``RANK``)."""
    pids = {}
    for pid in _children(agent_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:  # gone meanwhile
            continue
        if b"RANK" in variables:
            pids[int(variables[b"RANK"])] = pid
    return pids


def _rank_pids(agent: subprocess.Popen, n: int = 2) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's ``n`` workers, once each runs with its rank (within 60 s)."""
    assert _wait_for(lambda: len(_worker_ranks(agent.pid)) >= n, agent, 60)
    return _worker_ranks(agent.pid)


def _long_run(voc, tmp_path, name, **overrides):
    flags = train_py("train", *options(voc, tmp_path, name, **{"epoch": 50, **overrides}))
    return subprocess.Popen(torchrun_args() + flags, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _history_steps(folder) -> int:
    path = os.path.join(folder, "history.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def test_a_killed_rank_ends_the_job_naming_it(same_size_voc, tmp_path):
    agent = _long_run(same_size_voc, tmp_path, "killed")
    try:
        pids = _rank_pids(agent)
        assert _wait_for(lambda: os.path.exists(tmp_path / "killed" / "last.pth"), agent)  # training
        start = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0 and time.monotonic() - start < 120
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", err) and "SIGKILL" in err, err[-3000:]


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_it(same_size_voc, tmp_path):
    agent = _long_run(same_size_voc, tmp_path, "hung", dist_timeout=10)
    try:
        pids = _rank_pids(agent)
        assert _wait_for(lambda: os.path.exists(tmp_path / "hung" / "last.pth"), agent)
        start = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)  # alive, not answering
        out, err = agent.communicate(timeout=150)
    finally:
        for pid in _children(agent.pid):
            os.kill(pid, signal.SIGCONT)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0 and time.monotonic() - start < 150
    assert "rank 0: a collective operation with the other processes failed" in err, err[-3000:]
    assert "rank(s) 1 stopped answering" in err, err[-3000:]


def test_sigterm_saves_one_checkpoint_every_rank_exits_and_the_resumed_run_is_exact(same_size_voc, tmp_path):
    epochs = 5
    reference = run(torchrun_args() + train_py("train", *options(same_size_voc, tmp_path, "reference",
                                                                  epoch=epochs)), tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    agent = _long_run(same_size_voc, tmp_path, "stopped", epoch=epochs)
    try:
        _rank_pids(agent)
        # in epoch 1 or later (the end of epoch 0 wrote last.pth), well before the end of the run
        assert _wait_for(lambda: os.path.exists(tmp_path / "stopped" / "last.pth"), agent, poll=0.02)
        os.kill(agent.pid, signal.SIGTERM)  # to torchrun, which passes it on to every rank
        out, err = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    assert agent.returncode != 0
    assert err.count("SIGTERM: stopping after the current step") == 2, err[-4000:]  # both ranks heard it
    assert "Traceback" not in out
    assert out.count("; saved ") == 1  # rank 0 saved and said so
    last = tmp_path / "stopped" / "last.pth"
    info = load_checkpoint(last)["other_info"]
    assert info["epoch"] >= 1 and len(info["rng_ranks"]) == 2
    flags = options(same_size_voc, tmp_path, "stopped", epoch=epochs)
    resumed = run(torchrun_args() + train_py("train", *flags, f"--load-path={last}"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stdout
    expected, got = weights(tmp_path / "reference" / "last.pth"), weights(last)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


def test_max_restarts_resume_from_last_pth(same_size_voc, tmp_path):
    steps = N_TRAIN // 2  # per epoch
    flags = train_py("train", *options(same_size_voc, tmp_path, "restarted", epoch=3))
    proc = run(torchrun_args(extra=["--max-restarts=1"]) + flags, tmp_path,
               SIMPLE_FASTER_RCNN_TEST_CRASH=f"1:{steps + 1}")  # rank 1 dies a step into epoch 1
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "restarted" / "last.pth"
    assert f"resumed from {last}: the start of epoch 1" in proc.stdout
    info = load_checkpoint(last)["other_info"]
    assert info["epoch"] == 3 and info["iteration"] == 3 * steps
    assert np.isfinite(info["best_map"])


_HEARTBEAT_SCRIPT = """
import time
import torch.distributed as dist
from utils import distributed
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
store = distributed._store()  # the group's (prefixed) view of it, where the heartbeat writes
distributed._start_heartbeat()
thread = distributed._heartbeat["thread"]
deadline = time.monotonic() + 10
while not store.check(["heartbeat/0"]) and time.monotonic() < deadline:
    time.sleep(0.01)
assert store.check(["heartbeat/0"]) and thread.is_alive()
start = time.monotonic()
distributed.cleanup()
assert not thread.is_alive() and distributed._heartbeat["thread"] is None and not dist.is_initialized()
print(f"STOPPED in {time.monotonic() - start:.3f} s")
"""


def test_cleanup_stops_the_heartbeat_thread_before_leaving_the_group(tmp_path):
    # a heartbeat left running may be inside a store call when the interpreter exits (a SIGABRT at exit)
    proc = run([sys.executable, "-c", _HEARTBEAT_SCRIPT], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED in" in proc.stdout
