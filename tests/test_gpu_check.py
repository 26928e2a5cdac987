"""The GPU verification command's CPU dry mode runs every part and prints every row."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["resflow_cifar10", "monotone_cifar10", "glow_cifar10", "ffjord_cifar10"]


def test_dry_run_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    assert table.startswith("device: cpu (dry run); torch ")
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| ")
    }
    for recipe in RECIPES:
        for mode in ("fp32", "bf16"):
            assert rows[f"{recipe} {mode}"].endswith("ms, n/a (cpu)"), (recipe, mode, rows[f"{recipe} {mode}"])
        assert f"{recipe} compiled" in rows and f"{recipe} syncs/step" in rows
    assert rows["DDP 2 x NCCL smoke"].startswith("skipped")
    for precision in ("32", "bf16-mixed"):
        assert "test/bpd" in rows[f"bits/dim glow fake CIFAR-10 {precision}"], rows


def test_refuses_without_gpu_unless_dry():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--tiny" in proc.stderr
