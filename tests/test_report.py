"""flowforge.report: the published-vs-reproduced table of a sweep from its run folders (or its W&B runs).

The fixture sweep (built in tmp_path) holds two tables: a 2x2 bits/dim table (finished runs, one with an
estimator std, two seeds of one cell, a smoke run, an incomplete run with a readable and one with a truncated
checkpoint, an extra run matching no cell) and a log-likelihood table with sign -1 in nats (nested job folders,
an incomplete run without checkpoint, a cell never run).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowforge import report

ROOT = Path(__file__).resolve().parents[1]

BPD_TABLE = {
    "name": "Toy Table 1: test bits/dim",
    "metric": "test/bpd",
    "sign": 1,
    "unit": "bits/dim",
    "better": "lower",
    "columns": ["MNIST", "CIFAR-10"],
    "rows": ["Real NVP", "Glow"],
    "claim": "Glow beats Real NVP on both datasets.",
    "claims": [  # not run (Real NVP / CIFAR-10 unfinished), held, not held
        {"better": "Glow", "than": "Real NVP", "columns": "all"},
        {"better": "Glow", "than": "Real NVP", "columns": ["MNIST"]},
        {"better": "Real NVP", "than": "Glow", "columns": ["MNIST"], "or_equal": True},
    ],
    "cells": [  # deliberately not in display order
        {
            "match": {"experiment": "glow_cifar10"},
            "row": "Glow",
            "column": "CIFAR-10",
            "published": 3.35,
            "status": "paper",
            "source": "Kingma & Dhariwal 2018, Table 2",
            "quote": "Table 2, row Glow, CIFAR-10: 3.35",
            "recipe": {"epochs": 1800},
        },
        {
            "match": {"experiment": "realnvp_mnist"},
            "row": "Real NVP",
            "column": "MNIST",
            "published": 1.06,
            "status": "to-verify",
            "source": "Papamakarios et al. 2017",
            "recipe": {"epochs": 100, "batch_size": 64},
        },
        {
            "match": {"experiment": "realnvp_cifar10"},
            "row": "Real NVP",
            "column": "CIFAR-10",
            "published": 3.49,
            "status": "two-copies",
            "source": "Dinh et al. 2017, Table 1",
            "recipe": {"steps": 500000},
        },
        {
            "match": {"experiment": "glow_mnist"},
            "row": "Glow",
            "column": "MNIST",
            "published": 1.05,
            "status": "two-copies",
            "source": "Kingma & Dhariwal 2018, Table 2",
            "recipe": {"epochs": 100},
        },
    ],
}
LL_TABLE = {
    "name": "Toy Table 2: test log-likelihood (nats)",
    "metric": "test/nll",
    "sign": -1,
    "unit": "nats",
    "better": "higher",
    "columns": ["POWER", "GAS"],
    "rows": ["MAF", "NSF"],
    "claim": None,
    "cells": [
        {
            "match": {"experiment": "maf_tabular", "dataset": "power"},
            "row": "MAF",
            "column": "POWER",
            "published": 0.24,
            "status": "paper",
            "source": "Papamakarios et al. 2017, Table 1",
            "quote": "Table 1, row MAF, POWER: 0.24",
            "recipe": {"steps": 400000},
        },
        {
            "match": {"experiment": "maf_tabular", "dataset": "gas"},
            "row": "MAF",
            "column": "GAS",
            "published": 10.08,
            "status": "two-copies",
            "source": "Papamakarios et al. 2017, Table 1",
            "recipe": {"steps": 400000},
        },
        {
            "match": {"experiment": "nsf_tabular", "dataset": "power"},
            "row": "NSF",
            "column": "POWER",
            "published": 0.66,
            "status": "to-verify",
            "source": "Durkan et al. 2019",
            "recipe": {"steps": 400000},
        },
        {
            "match": {"experiment": "nsf_tabular", "dataset": "gas"},
            "row": "NSF",
            "column": "GAS",
            "published": None,
            "status": "none",
            "source": "",
            "recipe": {"steps": 400000},
        },
    ],
}

# the reference and departures blocks of some recipes, as composed into their runs' configs
RECIPE_BLOCKS = {
    "realnvp_mnist": {
        "reference": {"paper": "Dinh et al. 2017, Sec. 4.1", "code": {"repo": "example/realnvp", "file": "train.py"}},
        "departures": [
            {"key": "optim.lr", "reason": "the paper's\n  schedule is not stated"},
            {"key": "trainer.max_epochs", "reason": "100 as Glow"},
        ],
    },
    "glow_mnist": {"reference": {"paper": "Kingma & Dhariwal 2018, Sec. 5"}, "departures": []},
}

# folder, table, overrides, smoke, metrics (None: unfinished), checkpoint ("ok", "truncated", None), W&B state
RUNS = [
    (
        "0",
        BPD_TABLE,
        ["experiment=realnvp_mnist"],
        False,
        {
            "test/bpd": 1.0712,
            "test/loss": 1.0712,
            "test/loss_std": 0.0021,
            "test/nll": 580.4,
            "epochs_run": 100.0,
            "global_step": 93800.0,
        },
        None,
        "finished",
    ),
    ("1", BPD_TABLE, ["experiment=realnvp_cifar10"], False, None, "ok", "running"),
    (
        "2",
        BPD_TABLE,
        ["experiment=glow_mnist", "seed=0"],
        False,
        {"test/bpd": 1.052, "test/loss": 1.052, "epochs_run": 100.0, "global_step": 93800.0},
        None,
        "finished",
    ),
    (
        "3",
        BPD_TABLE,
        ["experiment=glow_mnist", "seed=1"],
        False,
        {"test/bpd": 1.058, "test/loss": 1.058, "epochs_run": 100.0, "global_step": 93800.0},
        None,
        "finished",
    ),
    (
        "4",
        BPD_TABLE,
        ["experiment=glow_cifar10", "smoke=true"],
        True,
        {"test/bpd": 5.8123, "test/loss": 5.8123, "epochs_run": 1.0, "global_step": 4.0},
        None,
        "finished",
    ),
    ("5", BPD_TABLE, ["experiment=glow_cifar10"], False, None, "truncated", "crashed"),
    (
        "10",
        BPD_TABLE,
        ["experiment=nice_mnist"],
        False,
        {"test/bpd": 1.3, "test/loss": 1.3, "epochs_run": 100.0, "global_step": 93800.0},
        None,
        "finished",
    ),
    (
        "ll/0",
        LL_TABLE,
        ["experiment=maf_tabular", "dataset=power"],
        False,
        {
            "test/nll": -0.2513,
            "test/loss": -0.2513,
            "test/loss_std": 0.0123,
            "epochs_run": 41.0,
            "global_step": 400000.0,
        },
        None,
        "finished",
    ),
    (
        "ll/1",
        LL_TABLE,
        ["experiment=nsf_tabular", "+dataset=gas"],
        False,
        {"test/nll": -12.871, "test/loss": -12.871, "epochs_run": 300.0, "global_step": 400000.0},
        None,
        "finished",
    ),
    ("ll/2", LL_TABLE, ["experiment=maf_tabular", "dataset=gas"], False, None, None, "failed"),
]

EXPECTED_MD = """\
## Toy Table 1: test bits/dim

Reproduced: test/bpd (bits/dim, lower is better), from 7 runs.

| Row | Column | Published | Reproduced | Trained (run/recipe) | Δ | Status |
|---|---|---|---|---|---|---|
| Real NVP | MNIST | 1.06 (to-verify) | 1.071 ± 0.002 | 100/100 epochs | +0.011 | done |
| Real NVP | CIFAR-10 | 3.49 (two-copies) | — | 4700/500000 steps | — | incomplete |
| Glow | MNIST | 1.05 (two-copies) | 1.055 ± 0.004 (n=2) | 100/100 epochs | +0.005 | done |
| Glow | CIFAR-10 | 3.35 (paper) | 5.812 | 1/1800 epochs | — | smoke |
| Glow | CIFAR-10 | 3.35 (paper) | — | ?/1800 epochs | — | incomplete: checkpoint unreadable |
| extra | `experiment=nice_mnist` | — | 1.300 | 100/100 epochs | — | extra |

Claim: Glow beats Real NVP on both datasets.

Claims checked on the reproduced values:

- Glow better than Real NVP in every column: not run (no finished value on both sides in CIFAR-10; holds in MNIST)
- Glow better than Real NVP in MNIST: held
- Real NVP at least as good as Glow in MNIST: not held (fails in MNIST)

Recipes (reference and departures from the runs' stored configs):

- `realnvp_mnist` (1 run): paper: Dinh et al. 2017, Sec. 4.1; code: repo: example/realnvp, file: train.py
  - departure `optim.lr`: the paper's schedule is not stated
  - departure `trainer.max_epochs`: 100 as Glow
- `realnvp_cifar10` (1 run): reference not stated
- `glow_mnist` (2 runs): paper: Kingma & Dhariwal 2018, Sec. 5; no departures stated
- `glow_cifar10` (2 runs): reference not stated
- `nice_mnist` (1 run): reference not stated

- ± after a single run: the estimator's standard deviation of the test-set mean (test/loss_std).
- ± (n=k): the standard deviation over the k runs (seeds) of the cell; the value is their mean.
- smoke: run with smoke=true (tiny model and data, flowforge.smoke); its numbers are not comparable with the published ones.
- incomplete: the run has not written its final metrics (no metrics.json / W&B run not finished); Trained shows how far it got.
- extra: a run of this sweep whose overrides match no cell of the table.
- (paper): read in the paper's own text (the quote below gives the table row and where it is).
- (two-copies): two independent secondary copies agree; not read in the paper itself.
- (to-verify): one copy or none: check against the paper before quoting.
- Glow / CIFAR-10, quoted: "Table 2, row Glow, CIFAR-10: 3.35"

## Toy Table 2: test log-likelihood (nats)

Reproduced: -test/nll (nats, higher is better), from 3 runs.

| Row | Column | Published | Reproduced | Trained (run/recipe) | Δ | Status |
|---|---|---|---|---|---|---|
| MAF | POWER | 0.24 (paper) | 0.25 ± 0.01 | 400000/400000 steps | +0.01 | done |
| MAF | GAS | 10.08 (two-copies) | — | ?/400000 steps | — | incomplete: no checkpoint |
| NSF | POWER | 0.66 (to-verify) | — | —/400000 steps | — | not run |
| NSF | GAS | — | 12.87 | 400000/400000 steps | — | done |

Recipes (reference and departures from the runs' stored configs):

- `maf_tabular` (2 runs): reference not stated
- `nsf_tabular` (1 run): reference not stated

- ± after a single run: the estimator's standard deviation of the test-set mean (test/loss_std).
- incomplete: the run has not written its final metrics (no metrics.json / W&B run not finished); Trained shows how far it got.
- (paper): read in the paper's own text (the quote below gives the table row and where it is).
- (two-copies): two independent secondary copies agree; not read in the paper itself.
- (to-verify): one copy or none: check against the paper before quoting.
- MAF / POWER, quoted: "Table 1, row MAF, POWER: 0.24"
"""

EXPECTED_CSV = """\
table,row,column,status,published,published_status,source,reproduced,std,runs,spread,progress,target,progress_unit,difference,unit,overrides,run_ids,note
Toy Table 1: test bits/dim,Real NVP,MNIST,done,1.06,to-verify,Papamakarios et al. 2017,1.0712,0.0021,1,,100,100,epochs,0.0112,bits/dim,experiment=realnvp_mnist,0,
Toy Table 1: test bits/dim,Real NVP,CIFAR-10,incomplete,3.49,two-copies,"Dinh et al. 2017, Table 1",,,1,,4700,500000,steps,,bits/dim,experiment=realnvp_cifar10,1,
Toy Table 1: test bits/dim,Glow,MNIST,done,1.05,two-copies,"Kingma & Dhariwal 2018, Table 2",1.055,,2,0.004243,100,100,epochs,0.005,bits/dim,experiment=glow_mnist,2;3,
Toy Table 1: test bits/dim,Glow,CIFAR-10,smoke,3.35,paper,"Kingma & Dhariwal 2018, Table 2",5.8123,,1,,1,1800,epochs,,bits/dim,experiment=glow_cifar10,4,smoke=true: not comparable
Toy Table 1: test bits/dim,Glow,CIFAR-10,incomplete,3.35,paper,"Kingma & Dhariwal 2018, Table 2",,,1,,,1800,epochs,,bits/dim,experiment=glow_cifar10,5,checkpoint unreadable
Toy Table 1: test bits/dim,extra,,extra,,,,1.3,,1,,100,100,epochs,,bits/dim,experiment=nice_mnist,10,
Toy Table 2: test log-likelihood (nats),MAF,POWER,done,0.24,paper,"Papamakarios et al. 2017, Table 1",0.2513,0.0123,1,,400000,400000,steps,0.0113,nats,dataset=power experiment=maf_tabular,ll/0,
Toy Table 2: test log-likelihood (nats),MAF,GAS,incomplete,10.08,two-copies,"Papamakarios et al. 2017, Table 1",,,1,,,400000,steps,,nats,dataset=gas experiment=maf_tabular,ll/2,no checkpoint
Toy Table 2: test log-likelihood (nats),NSF,POWER,not run,0.66,to-verify,Durkan et al. 2019,,,0,,,400000,steps,,nats,dataset=power experiment=nsf_tabular,,
Toy Table 2: test log-likelihood (nats),NSF,GAS,done,,none,,12.871,,1,,400000,400000,steps,,nats,dataset=gas experiment=nsf_tabular,ll/1,
"""

EXPECTED_CLAIMS_CSV = """\
table,better,than,columns,or_equal,outcome,missing,failed
Toy Table 1: test bits/dim,Glow,Real NVP,MNIST;CIFAR-10,false,not run,CIFAR-10,
Toy Table 1: test bits/dim,Glow,Real NVP,MNIST,false,held,,
Toy Table 1: test bits/dim,Real NVP,Glow,MNIST,true,not held,,MNIST
"""


def _recipes_from_csv(text: str) -> list[tuple]:
    return [
        (
            r["table"][:12],
            r["recipe"],
            int(r["runs"]),
            json.loads(r["reference"]) if r["reference"] else None,
            json.loads(r["departures"]) if r["departures"] else None,
        )
        for r in csv.DictReader(io.StringIO(text))
    ]


EXPECTED_RECIPES = [
    (
        "Toy Table 1:",
        "realnvp_mnist",
        1,
        RECIPE_BLOCKS["realnvp_mnist"]["reference"],
        RECIPE_BLOCKS["realnvp_mnist"]["departures"],
    ),
    ("Toy Table 1:", "realnvp_cifar10", 1, None, None),
    ("Toy Table 1:", "glow_mnist", 2, RECIPE_BLOCKS["glow_mnist"]["reference"], []),
    ("Toy Table 1:", "glow_cifar10", 2, None, None),
    ("Toy Table 1:", "nice_mnist", 1, None, None),
    ("Toy Table 2:", "maf_tabular", 2, None, None),
    ("Toy Table 2:", "nsf_tabular", 1, None, None),
]


def _config(table: dict, overrides: list[str], smoke: bool) -> dict:
    experiment = dict(o.split("=", 1) for o in overrides).get("experiment")
    return {
        "task_name": "train",
        "smoke": smoke,
        "seed": 0,
        "trainer": {"max_epochs": 1 if smoke else 100},
        "overrides": list(overrides),
        "table": copy.deepcopy(table),
        **copy.deepcopy(RECIPE_BLOCKS.get(experiment, {})),
    }


def make_sweep(root: Path) -> Path:
    """The fixture multirun directory (Hydra's layout: <job>/.hydra/{config,overrides}.yaml, metrics.json,
    checkpoints/last.ckpt)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for folder, table, overrides, smoke, metrics, ckpt, _state in RUNS:
        run = root / folder
        (run / ".hydra").mkdir(parents=True)
        config = _config(table, overrides, smoke)
        if folder == "2":  # older runs: the overrides only in Hydra's overrides.yaml
            del config["overrides"]
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if metrics is not None:
            (run / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if ckpt is not None:
            (run / "checkpoints").mkdir()
            path = run / "checkpoints" / "last.ckpt"
            torch.save(
                {
                    "epoch": 12,
                    "global_step": 4700,
                    "state_dict": {"w": torch.zeros(1000)},
                    "hyper_parameters": {"config": {"smoke": False}},
                },
                path,
            )
            if ckpt == "truncated":
                path.write_bytes(path.read_bytes()[:300])
    (root / "0" / "wandb").mkdir()  # not searched
    return root


@pytest.fixture
def sweep(tmp_path):
    return make_sweep(tmp_path / "multirun")


class FakeRun:
    def __init__(self, path, config, summary, state):
        self.path, self.config, self.summary, self.state = path, config, summary, state
        self.name = path[-1]


class FakeApi:
    """``wandb.Api()`` stand-in: the fixture runs as W&B runs (config as logged by experiment.py)."""

    def __init__(self):
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        runs = []
        for i, (_folder, table, overrides, smoke, metrics, ckpt, state) in enumerate(RUNS):
            summary = dict(metrics or {})
            if ckpt == "ok":  # what Lightning logged before the run stopped
                summary.update({"epoch": 12, "trainer/global_step": 4700})
            runs.append(FakeRun(["ent", "proj", f"run{i}"], _config(table, overrides, smoke), summary, state))
        return runs[::-1]  # W&B lists the newest first


def _drop(csv_text: str, *columns: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in columns} for row in csv.DictReader(io.StringIO(csv_text))]


# ---------------------------------------------------------------------------------------------- tables
def test_report_reproduces_known_tables_from_fixture_run_dirs(sweep):
    tables = report.build_tables(report.collect_multirun(sweep))
    assert [t.name for t in tables] == [BPD_TABLE["name"], LL_TABLE["name"]]
    assert report.render_markdown(tables) == EXPECTED_MD
    assert report.render_csv(tables) == EXPECTED_CSV


def test_wandb_source_with_fake_api_gives_the_same_table(sweep):
    api = FakeApi()
    tables = report.build_tables(report.collect("wandb:ent/proj/ablation", api=api))
    assert api.calls == [("ent/proj", {"group": "ablation"})]
    report.collect_wandb("ent/proj", api=api)
    assert api.calls[-1] == ("ent/proj", None)
    # the same numbers; only the run ids and the reasons a run is unfinished (W&B state) differ
    got = _drop(report.render_csv(tables), "run_ids", "note")
    assert got == _drop(EXPECTED_CSV, "run_ids", "note")
    rows = csv.DictReader(io.StringIO(report.render_csv(tables)))
    notes = {(r["row"], r["column"], r["status"]): r["note"] for r in rows}
    assert notes[("Glow", "CIFAR-10", "incomplete")] == "crashed"
    assert notes[("MAF", "GAS", "incomplete")] == "failed"
    assert notes[("Real NVP", "CIFAR-10", "incomplete")] == "running"


def test_wandb_config_nested_under_module_hparams(sweep):
    class Api(FakeApi):
        def runs(self, path, filters=None):
            return [
                FakeRun(r.path, {"config": r.config, "_wandb": {"value": {}}}, r.summary, r.state)
                for r in super().runs(path, filters)
            ]

    tables = report.build_tables(report.collect_wandb("ent/proj", api=Api()))
    assert _drop(report.render_csv(tables), "run_ids", "note") == _drop(EXPECTED_CSV, "run_ids", "note")


def test_checkpoint_progress(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"epoch": 12, "global_step": 4700}, path)
    assert report.checkpoint_progress(path) == (12.0, 4700.0, "checkpoint")
    # Lightning's loop state: the epoch saved at its end counts as run
    torch.save(
        {
            "epoch": 0,
            "global_step": 40,
            "loops": {"fit_loop": {"epoch_progress": {"current": {"processed": 1}}}},
            "optimizer_states": [{"state": {}}],
        },
        path,
    )
    assert report.checkpoint_progress(path) == (1.0, 40.0, "checkpoint")
    path.write_bytes(path.read_bytes()[:100])
    assert report.checkpoint_progress(path) == (None, None, "checkpoint unreadable")
    (tmp_path / "b.ckpt").write_bytes(b"")
    assert report.checkpoint_progress(tmp_path / "b.ckpt")[2] == "checkpoint unreadable"


def test_std_of_bits_per_dim_converted_to_nats():
    spec = {"name": "t", "metric": "test/nll", "sign": -1, "cells": []}
    run = report.Run("r", {}, metrics={"test/nll": 5000.0, "test/bpd": 2.5, "test/loss": 2.5, "test/loss_std": 0.01})
    value, std = report._value(run, spec)
    assert value == -5000.0 and std == pytest.approx(20.0)
    run.metrics = {"test/nll": 5000.0, "test/loss": 7.0, "test/loss_std": 0.01}  # unknown units: no std
    assert report._value(run, spec) == (-5000.0, None)


def test_most_specific_cell_wins_and_booleans_match_as_hydra_writes_them():
    cells = [
        {"match": {"experiment": "a"}, "row": "r", "column": "plain", "status": "none", "recipe": {"epochs": 2}},
        {
            "match": {"experiment": "a", "model.act": "cpila", "model.monotone": True},
            "row": "r",
            "column": "cpila",
            "status": "none",
            "recipe": {"epochs": 2},
        },
    ]
    table = {
        "name": "t",
        "metric": "test/loss",
        "unit": "nats",
        "rows": ["r"],
        "columns": ["plain", "cpila"],
        "cells": cells,
    }
    runs = [
        report.Run(
            "0",
            {"table": table, "overrides": ["experiment=a", "model.act=cpila", "model.monotone=true"]},
            metrics={"test/loss": 1.0, "epochs_run": 2.0},
        ),
        report.Run("1", {"table": table, "overrides": ["experiment=a"]}, metrics={"test/loss": 2.0}),
    ]
    rows = report.build_tables(runs)[0].rows
    assert [(r["column"], r["run_ids"], r["reproduced"]) for r in rows] == [("plain", "1", 2.0), ("cpila", "0", 1.0)]


def test_wandb_mode_decisions(monkeypatch, tmp_path):
    """One rule for the logger config and the report (flowforge.wandb_mode): $WANDB_MODE, else online with an API
    key or a ~/.netrc entry, else offline."""
    from flowforge.wandb_mode import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    cases = (({"WANDB_MODE": "disabled"}, "disabled"), ({}, "offline"), ({"WANDB_API_KEY": "x"}, "online"))
    for env, expected in cases:
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert wandb_mode() == report._wandb_mode() == expected
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password x\n")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "online"


# ---------------------------------------------------------------------------------------------- errors
def test_error_for_missing_path(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; pass the multirun directory") as e:
        report.main([str(tmp_path / "nope")])
    assert str(tmp_path / "nope") in str(e.value)
    assert e.value.code == str(e.value)  # what the interpreter prints, with exit status 1 (None would exit 0)


def test_error_for_folder_without_hydra_runs(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no Hydra run under .*\.hydra/config\.yaml") as e:
        report.main([str(tmp_path)])
    assert e.value.code == str(e.value)


def test_runs_without_table_block_get_the_metrics_by_override_summary(tmp_path, capsys):
    """A plain multirun (no `table` block): one row per job, the varying override keys as columns, a job without
    metrics.json listed as failed with empty metrics."""
    jobs = [("model=realnvp", "seed=0"), ("model=realnvp", "seed=1"), ("model=glow", "seed=0")]
    for i, overrides in enumerate(jobs):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "config.yaml").write_text(
            f"smoke: false\noverrides: [{', '.join(overrides)}, trainer.max_steps=2]\n"
        )
        if i != 1:
            metrics = {"test/bpd": 1.5 + i, "test/nll": 10.0 + i, "val/loss": 9.0, "global_step": 2.0}
            (tmp_path / str(i) / "metrics.json").write_text(json.dumps(metrics))
    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "summary.md").read_text()
    rows = list(csv.reader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert rows == [
        ["job", "model", "seed", "status", "test/bpd", "test/nll", "val/loss", "global_step"],
        ["0", "realnvp", "0", "finished", "1.5", "10", "9", "2"],
        ["1", "realnvp", "1", "failed", "", "", "", ""],
        ["2", "glow", "0", "finished", "3.5", "12", "9", "2"],
    ]
    assert "| 1 | realnvp | 1 | failed | — | — | — | — |" in printed
    assert not (tmp_path / "report.md").exists()


def test_errors_for_bad_table_block_and_wandb_path(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "config.yaml").write_text("table: {name: t, metric: test/bpd}\n")
    with pytest.raises(SystemExit, match="lacks cells"):
        report.build_tables(report.collect_multirun(tmp_path))
    with pytest.raises(SystemExit, match="expected wandb:<entity>/<project>"):
        report.collect("wandb:justone", api=FakeApi())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"status": "confirmed"}, "'confirmed' is not one of paper, two-copies, to-verify, none"),
        ({"status": "to verify"}, "is not one of"),
        ({"quote": None}, "status paper needs a `quote:`"),
        ({"quote": " "}, "status paper needs a `quote:`"),
        ({"status": "none"}, "status none with a published number"),
        ({"status": "two-copies", "published": None, "quote": None}, "status two-copies without a published number"),
    ],
)
def test_provenance_rule_refuses_unbacked_cells(sweep, change, message):
    """Nothing is 'confirmed': a cell's status is paper (with a quote of the paper), two-copies, to-verify or none,
    and the report refuses a table that says otherwise, naming the cell."""
    config_path = sweep / "4" / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    cell = next(c for c in config["table"]["cells"] if c["status"] == "paper")
    cell.update(change)
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=message) as e:
        report.build_tables(report.collect_multirun(sweep))
    assert "'Glow' / 'CIFAR-10'" in str(e.value)


def test_recipes_listed_with_reference_and_departures_or_not_run(sweep):
    """Under each table: every recipe of its cells with the reference and departures stored in its runs' configs; a
    recipe without runs is ``not run``, one whose runs carry no blocks ``reference not stated``."""
    import shutil

    shutil.rmtree(sweep / "0")  # the only run of realnvp_mnist
    tables = report.build_tables(report.collect_multirun(sweep))
    assert [(r["recipe"], r["runs"]) for r in tables[0].recipes] == [
        ("realnvp_mnist", 0),
        ("realnvp_cifar10", 1),
        ("glow_mnist", 2),
        ("glow_cifar10", 2),
        ("nice_mnist", 1),
    ]
    glow = tables[0].recipes[2]
    assert glow["reference"] == RECIPE_BLOCKS["glow_mnist"]["reference"] and glow["departures"] == []
    markdown = report.render_markdown(tables)
    assert "- `realnvp_mnist`: not run\n- `realnvp_cifar10` (1 run): reference not stated\n" in markdown
    assert "departure `optim.lr`" not in markdown


def test_recipes_and_claims_the_same_from_wandb(sweep):
    local = report.build_tables(report.collect_multirun(sweep))
    remote = report.build_tables(report.collect("wandb:ent/proj", api=FakeApi()))
    assert [t.recipes for t in remote] == [t.recipes for t in local]
    assert [t.claims for t in remote] == [t.claims for t in local]


def test_claims_held_not_held_not_run(sweep):
    tables = report.build_tables(report.collect_multirun(sweep))
    assert [(c["outcome"], c["missing"], c["failed"]) for c in tables[0].claims] == [
        ("not run", ["CIFAR-10"], []),
        ("held", [], []),
        ("not held", [], ["MNIST"]),
    ]
    assert tables[1].claims == []
    rows = tables[0].rows
    spec = tables[0].spec
    # a tie: held only with or_equal; higher-is-better tables order the other way
    tie = [dict(r, reproduced=1.0) if r["column"] == "MNIST" else r for r in rows]
    claim = {"better": "Real NVP", "than": "Glow", "columns": ["MNIST"]}
    assert report.evaluate_claim(claim, spec, tie)["outcome"] == "not held"
    assert report.evaluate_claim({**claim, "or_equal": True}, spec, tie)["outcome"] == "held"
    assert report.evaluate_claim(claim, {**spec, "better": "higher"}, rows)["outcome"] == "held"
    # one failing column settles "every column" even while another column has not run
    partial = report.evaluate_claim({**claim, "columns": "all"}, spec, rows)
    assert (partial["outcome"], partial["failed"], partial["missing"]) == ("not held", ["MNIST"], ["CIFAR-10"])
    assert tables[0].claims[0]["held_in"] == ["MNIST"]  # the columns run so far, named while others are missing
    # smoke values never settle a claim: Glow / CIFAR-10 only has a smoke run
    claim = {"better": "Glow", "than": "Real NVP", "columns": ["CIFAR-10"]}
    done = [dict(r, status="done", reproduced=3.0) if r["row"] == "Real NVP" else r for r in rows]
    assert report.evaluate_claim(claim, spec, done)["missing"] == ["CIFAR-10"]


@pytest.mark.parametrize(
    "claims, message",
    [
        ({"better": "Glow"}, r"`claims` must be a non-empty list"),
        ([], r"`claims` must be a non-empty list"),
        (["Glow > Real NVP"], r"claim 0: 'Glow > Real NVP' is not a mapping"),
        (
            [{"better": "Glow", "than": "NICE", "columns": "all"}],
            r"claim 0: than: 'NICE' is not one of the table's "
            r"rows \(Real NVP, Glow\)",
        ),
        (
            [
                {"better": "Glow", "than": "Real NVP", "columns": "all"},
                {"better": "Glow", "than": "Glow", "columns": "all"},
            ],
            r"claim 1: better and than name the same row 'Glow'",
        ),
        (
            [{"better": "Glow", "than": "Real NVP", "columns": ["MNIST", "SVHN"]}],
            r"claim 0: columns 'SVHN' are not among the table's columns \(MNIST, CIFAR-10\)",
        ),
        ([{"better": "Glow", "than": "Real NVP"}], r"columns: None is neither `all` nor a non-empty list"),
        (
            [{"better": "Glow", "than": "Real NVP", "columns": "all"}],  # (the Glow / MNIST cell removed below)
            r"row 'Glow' has no cell in column 'MNIST', so the claim could never be settled",
        ),
        (
            [{"better": "Glow", "than": "Real NVP", "columns": "all", "lower_is_better": True}],
            r"unknown key\(s\) lower_is_better \(allowed: better, than, columns, or_equal\)",
        ),
        ([{"better": "Glow", "than": "Real NVP", "columns": "all", "or_equal": "yes"}], r"or_equal: 'yes' is not true"),
    ],
)
def test_bad_claims_refused_with_the_reason(sweep, claims, message):
    config_path = sweep / "4" / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["table"]["claims"] = claims
    if "no cell in column" in message:
        config["table"]["cells"] = [c for c in config["table"]["cells"] if (c["row"], c["column"]) != ("Glow", "MNIST")]
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match=message) as e:
        report.build_tables(report.collect_multirun(sweep))
    assert f"table {BPD_TABLE['name']!r} (run 4 in " in str(e.value)
    assert report.claims_problem({**BPD_TABLE, "better": None}).startswith("`claims` need the table's `better:")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_prints_and_writes_report_without_importing_lightning(sweep, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flowforge.report", str(sweep), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # incomplete runs do not fail the report
    assert proc.stdout == EXPECTED_MD
    assert (out / "report.md").read_text() == EXPECTED_MD
    assert (out / "report.csv").read_text() == EXPECTED_CSV
    assert (out / "claims.csv").read_text() == EXPECTED_CLAIMS_CSV
    assert _recipes_from_csv((out / "recipes.csv").read_text()) == EXPECTED_RECIPES
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # it read the checkpoints of the unfinished runs ...
    assert not {m for m in imported if m.split(".")[0] in ("pytorch_lightning", "lightning", "wandb")}  # ... only
    assert f"wrote {out / 'report.md'}" in proc.stderr


def test_main_writes_into_the_multirun_dir_by_default(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    assert capsys.readouterr().out == EXPECTED_MD
    assert (sweep / "report.md").read_text() == EXPECTED_MD and (sweep / "report.csv").read_text() == EXPECTED_CSV
    assert (sweep / "claims.csv").read_text() == EXPECTED_CLAIMS_CSV


# ---------------------------------------------------------------------------------------------- W&B upload
def test_wandb_table_logged_offline_and_read_back(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tables = report.build_tables(report.collect_multirun(sweep))
    folders = report.log_to_wandb(tables, "flowforge-reports", dir=tmp_path, source=str(sweep))
    assert len(folders) == 2
    lines = EXPECTED_CSV.splitlines()
    for folder, table, expected in zip(folders, tables, (lines[1:7], lines[7:])):
        folder = Path(folder)
        assert folder.parent == tmp_path / "wandb" and folder.name.startswith("offline-run-")
        record = next(folder.glob("run-*.wandb")).read_bytes()
        assert b"report-" + table.name.encode() in record  # the run's name
        assert b'"table-file"' in record and b"report" in record  # the history entry pointing at the table file
        logged = [json.loads(p.read_text()) for p in (folder / "files" / "media" / "table").glob("report_*.table.json")]
        assert len(logged) == 1
        assert logged[0]["columns"] == report.CSV_COLUMNS
        rows = [dict(zip(report.CSV_COLUMNS, r)) for r in logged[0]["data"]]
        want = list(csv.DictReader(io.StringIO("\n".join([lines[0], *expected]))))
        assert [(r["row"], r["column"], r["status"], r["runs"]) for r in rows] == [
            (w["row"], w["column"], w["status"], int(w["runs"])) for w in want
        ]
        for r, w in zip(rows, want):
            assert report._csv_value(r["reproduced"]) == w["reproduced"]
