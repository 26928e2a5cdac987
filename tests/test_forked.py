"""tests/forked.py: a command forked from the pre-imported interpreter behaves as the same command in a fresh one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import forked
import pytest

if not forked._fork_enabled():
    pytest.skip("the fork server runs on Linux only (and not under FLOWFORGE_TEST_FORK=0)", allow_module_level=True)

PROBE = """
import os, sys, torch, warnings
from threadpoolctl import threadpool_info
print(sys.argv, os.getcwd(), os.environ.get("FF_PROBE"), torch.get_num_threads(), torch.get_default_dtype())
print(sorted({p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas"}))
print(sys.path[0] == "", __name__)
print("to stderr", file=sys.stderr)
"""


def test_a_forked_run_sees_what_a_fresh_interpreter_sees(tmp_path):
    env = dict(os.environ, FF_PROBE="42", OMP_NUM_THREADS="1")
    runs = [forked.run(["-c", PROBE, "a", "b"], cwd=tmp_path, env=env, fork=fork) for fork in (True, False)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout
    assert f"['-c', 'a', 'b'] {tmp_path} 42 1 torch.float32" in runs[0].stdout
    assert runs[0].stderr.endswith("to stderr\n") and "to stderr" not in runs[0].stdout


@pytest.mark.parametrize(
    "code, status, stderr",
    [
        ("pass", 0, ""),
        ("import sys; sys.exit(3)", 3, ""),
        ("import sys; sys.exit('no data file')", 1, "no data file"),
        ("raise ValueError('bad value')", 1, "ValueError: bad value"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM, ""),
    ],
)
def test_exit_status_is_the_interpreters(code, status, stderr):
    run = forked.run(["-c", code])
    assert run.returncode == status, run.stderr
    assert stderr in run.stderr


def test_a_script_runs_as_main_with_its_folder_on_the_path(tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 7\n")
    (tmp_path / "main.py").write_text("import sys, helper\nif __name__ == '__main__':\n    sys.exit(helper.VALUE)\n")
    assert forked.run([str(tmp_path / "main.py")]).returncode == 7


def test_signals_timeouts_and_atexit(tmp_path):
    proc = forked.start(["-c", "import time; print('started', flush=True); time.sleep(60)"])
    out = Path(proc._out)
    deadline = time.monotonic() + 60
    while not (out.exists() and "started" in out.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and out == "started\n" and err is None
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run(["-c", "import time; time.sleep(60)"], timeout=1)
    marker = tmp_path / "atexit"
    code = f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).write_text, 'ran')"
    assert forked.run(["-c", code]).returncode == 0
    assert marker.read_text() == "ran"
    assert sys.executable == forked.run(["-c", "pass"]).args[0]
