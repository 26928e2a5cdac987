"""benchmarks/gpu_check.py: the dry run on the CPU prints every row of the table, and the GPU run refuses
clearly without a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import forked
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ResFlow", "Monotone", "Glow", "FFJORD", "TarFlow")


def _run(*args, timeout=120, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **env)
    return forked.run(["benchmarks/gpu_check.py", *args], cwd=ROOT, env=env, timeout=timeout)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().split("|")[1:-1]]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


@pytest.mark.slow
def test_dry_run_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    # compiled first: the residual, monotone and FFJORD compiles overrun the budget, their workers are killed, and
    # the eager modes after them run in fresh workers
    flags = "--device cpu --tiny --mode-budget 5 --modes compiled fp32 bf16-mixed".split()
    proc = _run(*flags, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    assert "torch " in text and "CUDA " in text and "- device: CPU" in text
    rows = [_cells(line) for line in text.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    by_check: dict[str, list[list[str]]] = {}
    for row in rows:
        assert len(row) == 6, row
        by_check.setdefault(row[0], []).append(row)
    for check in ("step time (ms)", "peak memory (GiB)", "host syncs per step"):
        assert [next(m for m in MODELS if r[1].startswith(m)) for r in by_check[check]] == list(MODELS)
    for row in by_check["step time (ms)"]:
        # eager fp32 and bf16 steps run for every recipe; the compiled one runs or reports its budget
        assert _is_number(row[2]) and _is_number(row[3]), row
        assert _is_number(row[4]) or "budget" in row[4], row
        assert "params" in row[5]
    for row in by_check["peak memory (GiB)"] + by_check["host syncs per step"]:
        assert row[2] == row[3] == "n/a (CPU)", row
    (bpd,) = next(v for k, v in by_check.items() if k.startswith("bits/dim after"))
    assert _is_number(bpd[2]) and _is_number(bpd[3]) and 0 < float(bpd[2]) < 16, bpd
    (ddp,) = by_check["DDP 2-process (NCCL) smoke"]
    assert ddp[2].startswith("skipped"), ddp


def test_refuses_without_a_gpu():
    proc = _run("--models", "Glow", timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "--device cpu --tiny" in proc.stderr
    proc = _run("--device", "cpu", timeout=60)
    assert proc.returncode == 2 and "--tiny" in proc.stderr


def test_an_error_raised_by_code_the_budget_interrupted_is_reported_as_the_budget():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def swallowing_work():
        # what torch.compile does when the alarm lands mid-trace: the Budget is caught and another error leaves
        # (its KeyError carries no trace of the Budget, neither as cause nor as context)
        try:
            while True:
                pass
        except gpu_check.Budget:
            pass
        raise KeyError("u")

    try:
        with gpu_check.budget(0.05):
            swallowing_work()
    except Exception as e:  # noqa: BLE001
        cell = gpu_check.error_cell(e)
    assert cell == "error: over its 0.05 s budget", cell
    try:
        with gpu_check.budget(5.0):
            raise KeyError("u")
    except Exception as e:  # noqa: BLE001
        cell = gpu_check.error_cell(e)
    assert cell == "error: KeyError: 'u'", cell
