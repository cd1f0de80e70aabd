"""utils/memory_format.py: forced settings, the probe's choice, the per-machine cache, a probe that leaves the
model and the RNG alone, and the CPU signature."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from model.faster_rcnn_toy import FasterRCNNToy
from utils import memory_format as mf
from utils.memory_format import CACHE_FILE, PHASES, choose_memory_format, cpu_signature

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (48, 64)  # small: a real probe of the toy extractor takes milliseconds


def toy(channels=(8, 16)) -> FasterRCNNToy:
    torch.manual_seed(0)
    return FasterRCNNToy(n_fg_class=3, channels=channels, rpn_channels=16, head_channels=8, fc_channels=16)


class ProbeCounter:
    """Wraps ``mf._probe``: counts the probes, runs the real one."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = mf._probe

        def probe(model, phase, image_size, reps, amp=False):
            self.calls.append((phase, tuple(image_size)) + (("amp",) if amp else ()))
            return real(model, phase, image_size, reps, amp)

        monkeypatch.setattr(mf, "_probe", probe)


def slow_format(monkeypatch, slow: str, extra: float = 1.0) -> list:
    """Make every timing of ``slow`` ``extra`` seconds longer (the step itself still runs)."""
    real, seen = mf._time_probe, []

    def timed(step, memory_format):
        seen.append(memory_format)
        return real(step, memory_format) + (extra if memory_format == mf._FORMATS[slow] else 0.0)

    monkeypatch.setattr(mf, "_time_probe", timed)
    return seen


@pytest.mark.parametrize("setting, expected", [("channels_last", torch.channels_last),
                                               ("contiguous", torch.contiguous_format)])
@pytest.mark.parametrize("phase", ["inference", "training"])
def test_forced_setting_returns_it_without_probe_or_cache(tmp_path, monkeypatch, setting, expected, phase):
    monkeypatch.setattr(mf, "_probe", lambda *a: pytest.fail("a forced setting must not probe"))
    lines = []
    assert choose_memory_format(toy(), phase, SIZE, setting=setting, cache_dir=tmp_path,
                                log=lines.append) == expected
    assert len(lines) == 1 and setting in lines[0] and "forced" in lines[0]
    assert not (tmp_path / CACHE_FILE).exists()


@pytest.mark.parametrize("kwargs", [{"phase": "train"}, {"setting": "nhwc"}, {"image_size": (0, 64)}])
def test_bad_arguments_raise(tmp_path, kwargs):
    args = {"phase": "inference", "image_size": SIZE, "setting": "auto"} | kwargs
    with pytest.raises(ValueError):
        choose_memory_format(toy(), cache_dir=tmp_path, log=None, **args)


@pytest.mark.parametrize("slow, fast", [("channels_last", torch.contiguous_format),
                                        ("contiguous", torch.channels_last)])
@pytest.mark.parametrize("phase", ["inference", "training"])
def test_probe_picks_the_faster_format(tmp_path, monkeypatch, slow, fast, phase):
    seen = slow_format(monkeypatch, slow)
    lines = []
    assert choose_memory_format(toy(), phase, SIZE, cache_dir=tmp_path, log=lines.append, reps=3) == fast
    # both formats timed reps times each, interleaved (never all of one format first)
    assert seen.count(torch.channels_last) == 3 and seen.count(torch.contiguous_format) == 3
    assert seen[0] != seen[1]
    entry = next(iter(json.loads((tmp_path / CACHE_FILE).read_text())["entries"].values()))
    assert entry["choice"] == ("contiguous" if slow == "channels_last" else "channels_last")
    assert entry["times"][slow] > 1.0 > entry["times"][entry["choice"]]
    assert entry["key"]["phase"] == phase and entry["key"]["image_size"] == list(SIZE)
    assert "measured" in lines[0] and "channels_last" in lines[0] and "contiguous" in lines[0]


def test_cache_is_reused_and_keyed_per_phase_size_threads_and_model(tmp_path, monkeypatch):
    counter = ProbeCounter(monkeypatch)
    slow_format(monkeypatch, "contiguous")
    model = toy()

    def choose(phase="training", size=SIZE, m=model, log=None, amp=False):
        return choose_memory_format(m, phase, size, cache_dir=tmp_path, log=log, amp=amp)

    assert choose() == torch.channels_last
    assert len(counter.calls) == 1
    lines = []
    assert choose(log=lines.append) == torch.channels_last  # from the cache, no second probe
    assert len(counter.calls) == 1 and "cached" in lines[0]
    choose(phase="inference")
    choose(size=(64, 48))
    assert counter.calls[1:] == [("inference", SIZE), ("training", (64, 48))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        choose()
    finally:
        torch.set_num_threads(threads)
    assert len(counter.calls) == 4
    choose(m=toy(channels=(8, 24)))  # another extractor
    assert len(counter.calls) == 5
    lines = []
    choose(amp=True, log=lines.append)  # another precision: --amp's autocast
    assert counter.calls[5] == ("training", SIZE, "amp") and "under --amp" in lines[0]
    choose(), choose(phase="inference"), choose(size=(64, 48)), choose(amp=True)  # all cached now
    assert len(counter.calls) == 6
    assert len(json.loads((tmp_path / CACHE_FILE).read_text())["entries"]) == 6
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_FILE]  # no temp file left behind


def test_cache_key_follows_the_frozen_parameters(tmp_path, monkeypatch):
    counter = ProbeCounter(monkeypatch)
    model = toy()
    choose_memory_format(model, "training", SIZE, cache_dir=tmp_path, log=None)
    model.extractor[0].weight.requires_grad_(False)  # another set of gradients to compute: another probe
    choose_memory_format(model, "training", SIZE, cache_dir=tmp_path, log=None)
    assert len(counter.calls) == 2


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"version": 2, "entries": [3]}',
                                     b'{"version": 99, "entries": {}}', b"\xff\xfe\x00garbage"])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch, content):
    counter = ProbeCounter(monkeypatch)
    slow_format(monkeypatch, "channels_last")
    (tmp_path / CACHE_FILE).write_bytes(content)
    with pytest.warns(UserWarning, match="memory-format cache"):
        fmt = choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None)
    assert fmt == torch.contiguous_format and len(counter.calls) == 1
    data = json.loads((tmp_path / CACHE_FILE).read_text())  # rewritten, valid
    assert data["version"] == 2 and len(data["entries"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None) == fmt
    assert len(counter.calls) == 1


def test_an_older_release_cache_is_probed_again_without_a_warning(tmp_path, monkeypatch):
    # version 1 was measured on other kernels (before Winograd ran on AMD CPUs): its choices do not count
    counter = ProbeCounter(monkeypatch)
    slow_format(monkeypatch, "channels_last")
    choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None)
    data = json.loads((tmp_path / CACHE_FILE).read_text())
    (entry,) = data["entries"].values()
    entry["choice"] = "channels_last"  # what the old kernels might have measured
    (tmp_path / CACHE_FILE).write_text(json.dumps({"version": 1, "entries": data["entries"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fmt = choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None)
    assert fmt == torch.contiguous_format and len(counter.calls) == 2  # measured again
    assert json.loads((tmp_path / CACHE_FILE).read_text())["version"] == 2


def test_invalid_entry_is_probed_again_and_other_entries_kept(tmp_path, monkeypatch):
    counter = ProbeCounter(monkeypatch)
    choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None)
    path = tmp_path / CACHE_FILE
    data = json.loads(path.read_text())
    key = next(iter(data["entries"]))
    data["entries"][key]["choice"] = "nhwc"
    data["entries"]["someone else's"] = {"choice": "contiguous", "times": {"contiguous": 1.0}}
    path.write_text(json.dumps(data))
    choose_memory_format(toy(), "inference", SIZE, cache_dir=tmp_path, log=None)
    assert len(counter.calls) == 2
    entries = json.loads(path.read_text())["entries"]
    assert entries[key]["choice"] in ("channels_last", "contiguous") and "someone else's" in entries


def test_unwritable_cache_warns_and_still_chooses(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.warns(UserWarning, match="cannot write"):
        fmt = choose_memory_format(toy(), "inference", SIZE, cache_dir=not_a_folder, log=None)
    assert fmt in (torch.channels_last, torch.contiguous_format)


@pytest.mark.parametrize("phase", ["inference", "training"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_probe_leaves_model_grads_mode_and_rng_alone(tmp_path, phase, mode):
    model = toy()
    model.extractor[0].weight.requires_grad_(False)  # a frozen layer, as VGG16's conv1/conv2
    model.train(mode == "train")
    model.head.eval()  # mixed modes must survive too
    model(torch.rand(1, 3, *SIZE))[1].sum().backward()  # some .grad to keep
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()

    choose_memory_format(model, phase, SIZE, cache_dir=tmp_path, log=None, reps=2)

    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.is_contiguous(), name  # not left in channels_last
        assert p.requires_grad == flags[name], name
        if grads[name] is None:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, grads[name]), name
    assert {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("amp, dtype", [(False, torch.float32), (True, torch.bfloat16)])
@pytest.mark.parametrize("phase", PHASES)
def test_probe_computes_in_the_runs_precision(tmp_path, amp, dtype, phase):
    seen = set()
    model = toy()
    # the probe runs deep copies of the extractor: the hook travels with them
    model.extractor[0].register_forward_hook(lambda module, inputs, out: seen.add(out.dtype))
    choose_memory_format(model, phase, SIZE, cache_dir=tmp_path, log=None, reps=1, amp=amp)
    assert seen == {dtype}


def test_real_probe_of_the_toy_model(tmp_path):
    lines = []
    fmt = choose_memory_format(toy(), "training", SIZE, cache_dir=tmp_path, log=lines.append, reps=2)
    assert fmt in (torch.channels_last, torch.contiguous_format)
    entry = next(iter(json.loads((tmp_path / CACHE_FILE).read_text())["entries"].values()))
    assert set(entry["times"]) == {"channels_last", "contiguous"}
    assert all(0 < t < 60 for t in entry["times"].values())
    assert entry["choice"] == min(entry["times"], key=entry["times"].get)
    assert entry["key"]["arch"] == "toy" and entry["key"]["cpu"]["threads"] == torch.get_num_threads()
    assert "training" in lines[0] and f"{SIZE[0]}x{SIZE[1]}" in lines[0]


def test_off_the_cpu_is_contiguous_without_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "_probe", lambda *a: pytest.fail("no probe off the CPU"))
    model = toy().to("meta")  # any non-CPU device takes the CUDA branch
    lines = []
    assert choose_memory_format(model, "training", SIZE, cache_dir=tmp_path, log=lines.append) == \
        torch.contiguous_format
    assert "meta" in lines[0] and not (tmp_path / CACHE_FILE).exists()
    assert choose_memory_format(model, "training", SIZE, setting="channels_last", cache_dir=tmp_path,
                                log=None) == torch.channels_last


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mf.default_cache_dir() == tmp_path / "simple-faster-rcnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mf.default_cache_dir() == tmp_path / "home" / ".cache" / "simple-faster-rcnn"


def test_cpu_signature_reads_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC 9B45\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 sha_ni\n\n"
        "processor\t: 1\nvendor_id\t: Other\ncpu family\t: 6\nmodel name\t: second\nflags\t: amx_tile\n"
    )
    sig = cpu_signature(cpuinfo)
    assert sig["model_name"] == "AMD EPYC 9B45" and sig["vendor"] == "AuthenticAMD"
    assert sig["cpu_family"] == "26" and sig["model"] == "2"
    assert sig["flags"] == ["avx2", "avx512_bf16", "avx512f", "fma"]  # relevant ones, sorted; not cpu 1's
    assert sig["torch"] == torch.__version__ and sig["threads"] == torch.get_num_threads()


def test_cpu_signature_without_cpuinfo_or_fields(tmp_path):
    sig = cpu_signature(tmp_path / "missing")
    assert sig["cpu_family"] is None and sig["model"] is None and sig["flags"] == []
    json.dumps(sig)  # still a usable cache key
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
                   "CPU part\t: 0xd4f\n")
    sig = cpu_signature(arm)
    assert sig["flags"] == ["asimd", "bf16", "i8mm", "sve"] and sig["model"] == "0xd4f"
    assert sig["vendor"] == "0x41"


def test_cpu_signature_of_this_machine_matches_proc_cpuinfo():
    sig = cpu_signature()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    first = text.split("\n\n")[0]
    values = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
    assert sig["model_name"] == values.get("model name", sig["model_name"])
    assert sig["cpu_family"] == values.get("cpu family")
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile"):
        assert (flag in sig["flags"]) == (flag in values.get("flags", "").split())


# A fresh process convolves images of _SHAPES sizes twice and counts the primitives oneDNN compiles again in
# the second pass (verbose "create:cache_miss" lines): more shapes than oneDNN's default cache holds.
_SHAPES = 3000
_CACHE_SCRIPT = f"""
import sys
if sys.argv[1] == "keep":
    from utils.memory_format import keep_onednn_primitives
    assert keep_onednn_primitives()
import torch
torch.set_num_threads(1)
conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
images = [torch.randn(1, 8, 32 + i // 60, 32 + i % 60).contiguous(memory_format=torch.channels_last)
          for i in range({_SHAPES})]
with torch.no_grad():
    for x in images:
        conv(x)
    print("SECOND PASS", flush=True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        for x in images:
            conv(x)
"""


def _second_pass_creations(mode: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    proc = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, mode], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env={**env, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    second = proc.stdout.split("SECOND PASS", 1)[1]
    return second.count("create:cache_miss"), second.count("create:cache_hit")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_keep_onednn_primitives_compiles_each_shape_once():
    misses, hits = _second_pass_creations("default")
    assert hits + misses >= _SHAPES and misses >= _SHAPES // 2  # the default cache overflows: compiled again
    misses, hits = _second_pass_creations("keep")
    assert misses == 0 and hits >= _SHAPES  # every shape's kernel kept from the first pass


def test_keep_onednn_primitives_leaves_the_users_setting(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    assert mf.keep_onednn_primitives() is False
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert mf.keep_onednn_primitives(4096) is True
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "4096"


def test_release_mkl_buffers_leaves_the_users_setting(monkeypatch):
    monkeypatch.setenv("MKL_DISABLE_FAST_MM", "0")
    assert mf.release_mkl_buffers() is False
    assert os.environ["MKL_DISABLE_FAST_MM"] == "0"
    monkeypatch.delenv("MKL_DISABLE_FAST_MM")
    assert mf.release_mkl_buffers() is True
    assert os.environ["MKL_DISABLE_FAST_MM"] == "1"
