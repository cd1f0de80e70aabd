"""The GPU run's scripts, on a machine without a GPU: bench/gpu.sh refuses cleanly, and bench/gpu_table.py
turns the benchmarks' JSON results into the summary table."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.gpu_table import table  # noqa: E402


def _result(bench, amp, batch, ours_s, theirs_s, ours_mib=2000.0, theirs_mib=2500.0):
    return {"bench": bench, "device": "cuda:0", "amp": amp, "batch_size": batch, "backbone": "vgg16",
            "memory_format": "contiguous",
            "ours": {"seconds": ours_s, "images_per_second": batch / ours_s, "peak_memory_mib": ours_mib},
            "torchvision": {"seconds": theirs_s, "images_per_second": batch / theirs_s,
                            "peak_memory_mib": theirs_mib}}


def test_gpu_table_reports_img_per_second_ratios_and_the_batch_1_targets():
    lines = table([_result("inference", False, 1, 0.0125, 0.02), _result("train", False, 1, 0.1, 0.08, 3500),
                   _result("train", True, 4, 0.2, 0.25)]).splitlines()
    assert lines[0].startswith("| benchmark | precision | batch | ours img/s")
    assert lines[2] == ("| inference | float32 | 1 | 80.0 | 50.0 | 0.62 | 2000 | 2500 | "
                        ">= 60 img/s, <= 3 GB: met |")
    assert lines[3].endswith(">= 20 img/s, <= 3 GB: MISSED |")  # 10 img/s and 3.5 GB
    assert lines[4] == "| train | amp | 4 | 20.0 | 16.0 | 0.80 | 2000 | 2500 |  |"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_sh_says_there_is_no_gpu_and_exits_2(tmp_path):
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PY": sys.executable, "OUT": str(tmp_path)})
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not os.listdir(tmp_path)


def test_the_benchmarks_write_the_json_the_table_reads(tmp_path):
    from bench.inference import write_json

    class Args:
        amp, batch_size, backbone = True, 4, "resnet101"

    path = tmp_path / "r.json"
    write_json(path, "inference", Args, torch.device("cpu"), "channels_last",
               {("ours", "channels_last"): 2.0, ("torchvision", "channels_last"): 4.0},
               {("ours", "channels_last"): 100.0})
    record = json.loads(path.read_text())
    assert record["ours"]["images_per_second"] == 2.0 and record["torchvision"]["peak_memory_mib"] is None
    assert "| inference | amp | 4 | 2.0 | 1.0 | 0.50 | 100 |  |  |" in table([record])
