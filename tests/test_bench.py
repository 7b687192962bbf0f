"""bench.py: the quick run prints every row, and the CPU peak-memory count is exact."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from tools import bench

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_prints_every_row(tmp_path, last_error):
    # from an empty folder: no prepared dataset there, so the data row is a note and nothing is
    # written
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", "--device", "cpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, last_error(result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "torch " in lines[0] and "1 threads" in lines[0]
    table = "\n".join(lines[1:])
    for label in ("sparsemax fwd+bwd (32, 16384) fp32", "ours", "full sort",
                  "train step, tiny, batch 16",
                  "CLIP+FDT", "fdt_fast.FDT", "fdt.FDT", "train step, tiny CLIP, batch 16",
                  "data loading, shapes val"):
        assert label in table, label
    assert "entmax k=64" in table or "entmax not installed: skipped" in table
    assert "open_clip" in table
    assert "no shapes dataset" in table
    assert list(tmp_path.iterdir()) == []


def test_cpu_peak_memory_counts_live_and_allocated_tensors():
    live = [torch.zeros(1000)]                                   # 4000 bytes held before

    def f():
        a = torch.empty(2**20)                                   # 4 MiB
        b = torch.empty(2**21)                                   # 8 MiB: 12 MiB held at once
        del a
        c = torch.empty(2**19)                                   # 10 MiB held
        return b, c

    assert bench.peak_memory(f, torch.device("cpu"), live) == 4000 + 12 * 2**20


def test_flop_count_lists_both_heads_and_fdt_costs_more(monkeypatch):
    monkeypatch.setattr(bench, "PRESETS", {"tiny": bench.PRESETS["tiny"]})
    (_, clip, clip_params, clip_flops), (_, fdt, fdt_params, fdt_flops) = bench.count_flops()
    assert (clip, fdt) == ("CLIP", "CLIP+FDT")
    assert fdt_params > clip_params and fdt_flops > clip_flops > 0
