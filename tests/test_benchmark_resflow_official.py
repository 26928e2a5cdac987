"""benchmarks/resflow_official.py runs the official Residual Flows code and flowforge side by side."""

import os
from pathlib import Path

import forked
import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = os.environ.get("FLOWFORGE_OFFICIAL_RESFLOWS", "/work/scratch/residual-flows")


@pytest.mark.skipif(not os.path.isdir(os.path.join(OFFICIAL, "resflows")), reason="official code not present")
def test_resflow_official_benchmark_tiny_run():
    cmd = ["benchmarks/resflow_official.py", "--official-dir", OFFICIAL, "--threads", "1"]
    cmd += ["--nblocks", "1", "--hidden", "8", "--batch", "16", "--steps", "1", "--rounds", "2", "--warmup", "1"]
    cmd += ["--nll-steps", "3", "--n-test", "32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = forked.run(cmd, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for row in (
        "| official: neumann",
        "| flowforge: neumann",
        "| official: backprop",
        "| neumann | **",
        "| backprop | **",
    ):
        assert row in out.stdout, row
    nll = [line for line in out.stdout.splitlines() if line.startswith("| official: neumann |")]
    assert nll and float(nll[0].split("|")[2]) > 0  # the test-NLL table row of the official model


def test_resflow_official_benchmark_missing_dir(tmp_path):
    cmd = ["benchmarks/resflow_official.py", "--official-dir", str(tmp_path / "nope")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = forked.run(cmd, cwd=ROOT, env=env, timeout=120)
    assert out.returncode != 0
    assert "git clone https://github.com/rtqichen/residual-flows" in out.stderr
