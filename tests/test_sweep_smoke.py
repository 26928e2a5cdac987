"""Every sweep's smoke variant, end to end: ``python train.py -m --config-dir sweeps --config-name
<sweep> smoke=true`` on tiny files in the real formats (``python -m flowforge.data.fake``), then
``python -m flowforge.report`` on the multirun folder: the whole path multirun -> results -> report, on a CPU.

Every recipe of a sweep runs, each once: the sweep file runs with its axes other than ``experiment`` cut to their
first value (a copy of the file that differs only there).  Each table cell of those runs must come out as one
finished smoke run with its published number and recipe carried through, and every other cell as ``not run``
with its published number.  The remaining grid points are composed, and their models and data modules built at
smoke size, by test_sweeps; every model x dataset pair trains a step in test_combinations."""

import csv
import os

import forked
import pytest
import yaml
from conftest import ROOT

from flowforge.data.fake import write_fake_datasets

#: sweeps whose smoke variant is too slow for the suite, with where their parts are checked instead
NOT_SMOKED = {
    "sbibm_npe": "15 runs, each with C2ST classifiers (about 150 s on one core); test_sweeps composes every job and "
    "checks its recipe, test_sbi runs dataset=sbi end to end (train.py smoke run, C2ST, report metrics)",
    "tarflow_likelihood": "one run, experiment=tarflow_imagenet64, which test_tarflow_recipes runs as a smoke run; "
    "test_sweeps composes the job and checks its table cell",
}
SWEEPS = sorted(
    p for p in (ROOT / "sweeps").glob("*.yaml") if "table" in yaml.safe_load(p.read_text()) and p.stem not in NOT_SMOKED
)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_data")
    write_fake_datasets(root)
    return root


def first_values(spec: dict) -> dict[str, str]:
    """``{key: first value}`` for every sweep axis but ``experiment``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = spec["hydra"]["sweeper"]["params"]
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {
        o.get_key_element(): next(o.sweep_string_iterator())
        for o in parsed
        if o.get_key_element() != "experiment" and o.is_sweep_override()
    }


def run(*args, timeout=900):
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return forked.run(args, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_smoke_sweep_runs_every_cell_and_reports_it(sweep, fake_data, tmp_path):
    spec = yaml.safe_load(sweep.read_text())
    table, chosen = spec["table"], first_values(spec)
    spec["hydra"]["sweeper"]["params"].update(chosen)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / sweep.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "multirun"
    p = run(
        "train.py",
        "-m",
        "--config-dir",
        str(tmp_path / "sweeps"),
        "--config-name",
        sweep.stem,
        "smoke=true",
        f"paths.data_dir={fake_data}",
        f"hydra.sweep.dir={out}",
        "trainer.enable_progress_bar=false",
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    p = run("-m", "flowforge.report", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert table["name"] in p.stdout
    with open(out / "report.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["table"] == table["name"]]
    by_cell = {(r["row"], r["column"]): r for r in rows if r["status"] != "extra"}
    assert set(by_cell) == {(c["row"], c["column"]) for c in table["cells"]}
    run_cells = 0
    for cell in table["cells"]:
        r = by_cell[(cell["row"], cell["column"])]
        if all(str(cell["match"].get(k, v)) == v for k, v in chosen.items()):
            assert r["status"] == "smoke" and r["runs"] == "1", r  # one finished run per cell, marked as smoke
            assert float(r["reproduced"]) == float(r["reproduced"])  # a number, not NaN
            run_cells += 1
        else:
            assert r["status"] == "not run" and r["runs"] in ("", "0"), r
        if cell["published"] is not None:
            assert float(r["published"]) == pytest.approx(cell["published"])
    assert run_cells, f"{sweep.stem}: the first values {chosen} select no cell"
    experiments = str(spec["hydra"]["sweeper"]["params"]["experiment"]).split(",")
    finished = len(list(out.glob("*/metrics.json")))
    assert finished >= len(experiments), f"{finished} finished runs for {len(experiments)} recipes"
