"""Every multirun ends with its metrics-by-override table: a real two-job ``train.py -m`` writes summary.md and
summary.csv into its sweep folder and prints the table; a failure to summarise never fails the sweep."""

import csv
import io
import os

import forked
from conftest import ROOT
from omegaconf import OmegaConf

from flowforge.multirun_summary import SummaryCallback

TINY = [
    "dataset.n_train=200",
    "dataset.n_val=100",
    "dataset.n_test=100",
    "dataset.batch_size=100",
    "trainer.max_steps=2",
    "model.hidden=[8]",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "callbacks.sample_figures.every_n_epochs=100",
]


def test_multirun_ends_with_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = forked.run(
        ["train.py", "-m", "model=realnvp", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = list(csv.reader(io.StringIO((sweep / "summary.csv").read_text())))
    header = rows[0]
    assert header[:3] == ["job", "seed", "status"]  # only the override that varies; model= is the same in both
    assert "test/nll" in header and "global_step" in header
    assert [r[:3] for r in rows[1:]] == [["0", "0", "finished"], ["1", "1", "finished"]]
    steps = header.index("global_step")
    assert [r[steps] for r in rows[1:]] == ["2", "2"]
    nll = header.index("test/nll")
    assert all(float(r[nll]) == float(r[nll]) for r in rows[1:])  # a number, not empty
    markdown = (sweep / "summary.md").read_text()
    assert markdown in out  # printed at the end of the sweep
    assert f"summary: {sweep / 'summary.md'}" in out


def test_failure_to_summarise_is_printed_not_raised(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "empty")}}})
    (tmp_path / "empty").mkdir()
    SummaryCallback().on_multirun_end(config)  # no job folders: must not raise
    err = capsys.readouterr().err
    assert "no multirun summary" in err and "no Hydra run under" in err
    assert f"python -m flowforge.report {tmp_path / 'empty'}" in err
