"""Every sweep file in sweeps/ lists only valid choices: each point of its grid composes with the real
config tree (the runs themselves are exercised for the small sweeps in test_experiments_fit.py).

The sweeps that reproduce a published table carry a ``table`` block that ``python -m flowforge.report`` reads:
its cells must be well formed, each must select exactly one point of the grid (matching the job overrides
exactly as Hydra's basic sweeper records them in ``overrides.task``), and each cell's ``recipe`` (epochs or
steps, batch size) must be what the composed run really does.  Composition and smoke-size model building
only: nothing trains here.
"""

import copy
import functools
import numbers
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose
from omegaconf import DictConfig, OmegaConf

from flowforge.report import PROVENANCE, claims_problem, provenance_problem

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
# flowforge.figures names these sweeps' runs by the recipe's own task_name, so they must not set one
FIGURE_SWEEPS = {"fit1d", "toy2d_monotone"}
TOP_KEYS = {"defaults", "hydra", "task_name", "table"}
TABLE_KEYS = {
    "name",
    "metric",
    "sign",
    "unit",
    "better",
    "columns",
    "rows",
    "claim",
    "cells",
}  # and `claims` (optional)
CELL_KEYS = {"match", "row", "column", "published", "status", "source", "recipe"}  # and `quote` (status paper)
# words that claim a check the provenance rule does not back (status paper with a quote is the only such claim)
UNBACKED = re.compile(r"\b(confirmed|verified|recalled)\b", re.IGNORECASE)
# cells per table and how many quote a published number (a cell dropped or a number lost shows up here)
CELLS = {
    "fit1d": (4, 0),
    "impflow_cifar10": (8, 8),
    "impflow_tabular": (5, 5),
    "iresnet_bias": (4, 0),
    "monotone_cifar10_ablation": (4, 0),
    "monotone_density": (10, 6),
    "resflow_ablation": (9, 9),
    "resflow_hybrid": (18, 0),
    "resflow_table1": (18, 18),
    "sbibm_npe": (15, 15),
    "tabular": (30, 30),
    "tarflow_likelihood": (1, 1),
    "toy2d_monotone": (16, 0),
}
# the run directory of job 0 of each sweep (the documented layouts; fit1d's and toy2d's are read by
# test_experiments_fit.py and flowforge.figures)
FIRST_SUBDIR = {
    "fit1d": "0_fit1d_resflow",
    "toy2d_monotone": "0_idensenet_toy_2spirals",
    "monotone_cifar10_ablation": "0_idensenet_cifar10_ablation_clipswish",
    "impflow_tabular": "0_power",
    "iresnet_bias": "0_power_series_0.9",
}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def grid(path: Path) -> list[list[str]]:
    """The jobs' overrides, exactly as Hydra's basic sweeper expands hydra.sweeper.params and records them
    (``overrides.task``: values re-serialised by Hydra, e.g. ``true`` -> ``True``, ``1.0e-3`` -> ``0.001``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = load(path)["hydra"]["sweeper"]["params"]
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@functools.cache
def _composed(overrides: tuple):
    return compose(list(overrides))


def composed(overrides) -> DictConfig:
    """conftest's compose (config_name="train"), cached per worker; a private copy for the caller."""
    return copy.deepcopy(_composed(tuple(overrides)))


def compose_sweep(path: Path, overrides, job_num: int = 0):
    """The sweep file itself as the primary config, with conf/ on the search path (what
    ``--config-dir sweeps --config-name <name>`` does), hydra node kept and hydra.job.num set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
        cfg = hydra_compose(
            config_name=path.stem,
            return_hydra_config=True,
            overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", *overrides],
        )
    with open_dict(cfg):
        cfg.hydra.job.num = job_num
    HydraConfig.instance().set_config(cfg)
    return cfg


def selects(cell: dict, job: list[str]) -> bool:
    return all(f"{k}={v}" in job for k, v in cell["match"].items())


def smoke_commands(path: Path) -> list[list[str]]:
    """The ``key=value`` arguments of each smoke command in the file's header (``python train.py -m --config-dir
    sweeps --config-name <name> smoke=true ...``, continued over lines ending in a backslash)."""
    lines = [line[1:].strip() for line in header(path).splitlines()]
    commands, i = [], 0
    while i < len(lines):
        if lines[i].startswith("python train.py") and "smoke=true" in lines[i]:
            command = lines[i].split("   #")[0].strip()
            while command.endswith("\\"):
                i += 1
                command = command[:-1].strip() + " " + lines[i].split("   #")[0].strip()
            args = command.split()
            assert args[:7] == ["python", "train.py", "-m", "--config-dir", "sweeps", "--config-name", path.stem], (
                command
            )
            commands.append(args[7:])
        i += 1
    return commands


def header(path: Path) -> str:
    return path.read_text().split("\ndefaults:")[0]


def with_values(cfg: DictConfig, overrides) -> DictConfig | None:
    """``cfg`` with ``key=value`` overrides of existing leaf values applied (``smoke=true``,
    ``paths.data_dir=...``: what composing them would give), or None when one is not such an override (a config
    group, a new key), which the caller then composes.  Saves composing a grid point twice."""
    for o in overrides:
        key, value = o.split("=", 1)
        if key.startswith(("+", "~")) or OmegaConf.is_config(OmegaConf.select(cfg, key, default=cfg)):
            return None
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return cfg


def assert_recipe_matches(cell: dict, cfg: DictConfig) -> None:
    """recipe.epochs (or recipe.steps when the recipe counts optimizer steps) and recipe.batch_size are what
    the run of the cell's grid point is configured to do; recipe.gpus is a count."""
    recipe = cell["recipe"]
    assert set(recipe) in ({"epochs", "batch_size", "gpus"}, {"steps", "batch_size", "gpus"}), recipe
    if "steps" in recipe:
        assert cfg.trainer.max_steps == recipe["steps"] > 0, (cell["match"], cfg.trainer.max_steps)
        assert cfg.trainer.max_epochs == -1, (cell["match"], "max_steps must decide")
    else:
        assert cfg.trainer.max_epochs == recipe["epochs"] > 0, (cell["match"], cfg.trainer.max_epochs)
        assert cfg.trainer.max_steps in (-1, None), (cell["match"], "max_epochs must decide")
    assert cfg.dataset.batch_size == recipe["batch_size"], (cell["match"], cfg.dataset.batch_size)
    assert isinstance(recipe["gpus"], int) and recipe["gpus"] >= 0, recipe


def assert_overrides_applied(path: Path, cfg: DictConfig, overrides) -> None:
    """Every sweep axis of ``overrides`` shows in the composed ``cfg`` as Hydra would set it."""
    for o in overrides:
        key, value = o.split("=", 1)
        if key == "estimator":  # a config group: its config names itself
            assert cfg.estimator.name == value, (path.name, o)
        elif key not in ("experiment", "dataset"):
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, (path.name, o)
    assert cfg.model._target_ and cfg.dataset._target_


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_composes_and_its_smoke_run_builds(path):
    """Every point of the grid composes with its overrides applied; each table cell's recipe is what the run of
    its grid point is configured to do (:func:`assert_recipe_matches`); and the smoke command(s) in the header
    expand to jobs whose data module, model (with dequantiser, estimator and objective heads) all build at
    smoke size, so a grid point the model cannot express (e.g. a squeeze too many) or an override a loader
    does not take fails here and not in a sweep.  Together the smoke commands run every point of the grid; each
    point is composed once."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flowforge.experiment import build
    from flowforge.smoke import shrink

    spec = load(path)
    params, cells = spec["hydra"]["sweeper"]["params"], spec["table"]["cells"]
    points = {tuple(sorted(job)) for job in grid(path)}
    assert points
    covered, checked = set(), set()
    commands = smoke_commands(path)
    assert commands, f"{path.name}: no smoke command (python train.py -m ... smoke=true) in the header"
    for args in commands:
        assert "smoke=true" in args
        cli = [a for a in args if not a.startswith("hydra.")]
        overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + cli)
        for job in (list(j) for batch in BasicSweeper.split_arguments(overrides, None) for j in batch):
            point = [o for o in job if o.split("=", 1)[0] in params]
            cfg = composed(point)
            assert_overrides_applied(path, cfg, point)
            for i, cell in enumerate(cells):
                if selects(cell, point):
                    assert_recipe_matches(cell, cfg)
                    checked.add(i)
            cfg = with_values(cfg, [o for o in job if o not in point]) or composed(job)
            _, module = build(shrink(cfg))
            assert sum(p.numel() for p in module.parameters()) > 0, job
            covered.add(tuple(sorted(point)))
    assert points <= covered, f"grid points no smoke command runs: {sorted(points - covered)}"
    assert checked == set(range(len(cells))), "a table cell selects no grid point"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_layout(path):
    """Only the keys the format allows (so composing train.yaml with a grid point is the same job config
    as the real sweep's, plus table and task_name), the documented commands in the header, run folders
    under logs/<name>/multiruns/ with the documented names."""
    spec, name = load(path), path.stem
    assert set(spec) <= TOP_KEYS, set(spec) - TOP_KEYS
    assert spec["defaults"] == ["train", "_self_"]
    if name in FIGURE_SWEEPS:
        assert "task_name" not in spec
    else:
        assert spec["task_name"] == name
    assert spec["hydra"]["sweep"]["dir"].startswith(f"${{paths.log_dir}}/{name}/multiruns/")
    text = header(path)
    assert f"python train.py -m --config-dir sweeps --config-name {name}" in text
    assert "smoke=true" in text
    if spec.get("table"):
        assert f"python -m flowforge.report logs/{name}/multiruns/<time>" in text
    first = grid(path)[0]
    cfg = compose_sweep(path, first)
    assert cfg.hydra.sweep.subdir == FIRST_SUBDIR.get(name, "0")
    assert cfg.table == spec.get("table")  # the job config carries the table for the report
    assert cfg.task_name == spec.get("task_name", composed(first).task_name)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_table_block_is_valid(path):
    table = load(path).get("table")
    assert table is not None, f"{path.name}: every sweep reproduces a table or figure and says so in `table`"
    assert set(table) - {"claims"} == TABLE_KEYS, set(table) ^ TABLE_KEYS
    # the orderings the claim states, in the form the report checks (rows, columns and cells exist)
    assert claims_problem(table) is None, claims_problem(table)
    assert table.get("claims") is None or table["claim"], "claims without the sentence they check"
    assert isinstance(table["name"], str) and table["name"]
    assert isinstance(table["metric"], str) and "/" in table["metric"]
    assert table["sign"] in (1, -1)
    assert table["better"] in ("lower", "higher")
    assert isinstance(table["unit"], str) and table["unit"]
    columns, rows = table["columns"], table["rows"]
    assert columns and len(set(columns)) == len(columns) and all(isinstance(c, str) for c in columns)
    assert rows and len(set(rows)) == len(rows) and all(isinstance(r, str) for r in rows)
    cells = table["cells"]
    assert cells
    for cell in cells:
        assert set(cell) - {"quote"} == CELL_KEYS, (cell, set(cell) ^ CELL_KEYS)
        assert cell["row"] in rows and cell["column"] in columns, cell
        assert isinstance(cell["match"], dict) and cell["match"], cell
        # values as Hydra records them: strings, compared verbatim with the job's key=value overrides
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in cell["match"].items()), cell["match"]
        published = cell["published"]
        assert published is None or (isinstance(published, numbers.Real) and not isinstance(published, bool)), cell
        assert provenance_problem(cell) is None, (cell, provenance_problem(cell))
        if cell["status"] == "paper":  # the quote gives the number it backs
            assert published in [float(x) for x in re.findall(r"-?\d+\.\d+", cell["quote"])], cell
        assert isinstance(cell["source"], str) and cell["source"], cell
    matches = [tuple(sorted(c["match"].items())) for c in cells]
    assert len(set(matches)) == len(matches), "two cells with the same match"
    places = [(c["row"], c["column"]) for c in cells]
    assert len(set(places)) == len(places), "two cells in the same place"
    if all(c["published"] is None for c in cells):
        assert isinstance(table["claim"], str) and table["claim"], "no number to quote: say what the table shows"
    else:
        assert table["claim"] is None or (isinstance(table["claim"], str) and table["claim"])
    assert (len(cells), sum(c["published"] is not None for c in cells)) == CELLS[path.stem]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_each_cell_selects_exactly_one_grid_point(path):
    jobs = grid(path)
    cells = load(path)["table"]["cells"]
    for cell in cells:
        hits = [job for job in jobs if selects(cell, job)]
        assert len(hits) == 1, (cell["match"], hits)
    for job in jobs:  # points of the product that are in no cell (e.g. i-ResNet + LipSwish) are allowed
        assert sum(selects(cell, job) for cell in cells) <= 1, job
    # extra overrides on the command line (trainer=gpu, smoke=true, paths.data_dir=...) keep the cells
    for cell in cells:
        job = next(j for j in jobs if selects(cell, j))
        assert selects(cell, ["smoke=True", "trainer=gpu", *job, "paths.data_dir=/tmp/fake"])


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_no_unbacked_provenance_words(path):
    """Only a cell with status paper and a quote of the paper's text claims a checked number: no `confirmed`,
    `verified` or `recalled` anywhere in a sweep file (statuses: one of PROVENANCE)."""
    assert set(PROVENANCE) == {"paper", "two-copies", "to-verify", "none"}
    hits = [line for line in path.read_text().splitlines() if UNBACKED.search(line)]
    assert not hits, hits


def sweep_recipes() -> list[str]:
    """The conf/experiment recipes the sweeps run: the grids' ``experiment`` values and the cells' matches."""
    names = set()
    for path in SWEEPS:
        spec = load(path)
        grid_names = spec["hydra"]["sweeper"]["params"].get("experiment")
        names |= set(str(grid_names).split(",")) if grid_names else set()
        names |= {c["match"]["experiment"] for c in spec["table"]["cells"] if "experiment" in c["match"]}
    return sorted(names)


# a recipe holds no quotes (a published number is backed by a sweep cell's quote), so it claims no check
CHECK_WORDS = re.compile(r"\b(confirmed|verified)\b", re.IGNORECASE)


@pytest.mark.parametrize("name", sweep_recipes())
def test_sweep_recipes_state_reference_and_departures(name):
    """Every recipe a sweep runs says what it follows (``reference.paper``: the paper and section or table, and
    how far it was read; optionally ``reference.code``: repository, file and the command or default it copies)
    and lists every key that knowingly differs in ``departures`` (key and reason, each key a real config key of
    the composed run). Its comments and blocks use no `confirmed` / `verified`: those words need a quote."""
    path = ROOT / "conf" / "experiment" / f"{name}.yaml"
    text = path.read_text()
    spec = yaml.safe_load(text)
    reference = spec.get("reference")
    assert isinstance(reference, dict), f"{name}: no reference mapping"
    assert set(reference) <= {"paper", "code"}, set(reference)
    assert isinstance(reference.get("paper"), str) and reference["paper"].strip(), name
    code = reference.get("code")
    assert code is None or (isinstance(code, dict) and isinstance(code.get("repo"), str) and "/" in code["repo"]), code
    departures = spec.get("departures")
    assert isinstance(departures, list), f"{name}: no departures list ([] when it follows its reference in every key)"
    cfg = composed([f"experiment={name}"])
    for entry in departures:
        assert isinstance(entry, dict) and set(entry) == {"key", "reason"}, entry
        assert isinstance(entry["key"], str) and entry["key"], entry
        assert isinstance(entry["reason"], str) and entry["reason"].strip(), entry
        node = cfg
        for part in entry["key"].split("."):
            assert part in node, (name, entry["key"], "not a key of the composed run")
            node = node[part]
    keys = [entry["key"] for entry in departures]
    assert len(set(keys)) == len(keys), f"{name}: a key listed twice"
    # the composed run carries the recipe's own blocks (not a parent recipe's code or departures)
    assert cfg.departures == departures or (not departures and not cfg.departures)
    assert cfg.reference.get("code") == (dict(code) if code else None)
    hits = [line for line in text.splitlines() if CHECK_WORDS.search(line)]
    assert not hits, hits


def test_match_values_are_written_as_hydra_records_them():
    """A number or a fraction in a grid is recorded by Hydra in its own spelling; the hybrid table's
    lambda column relies on 0, 1/D and 1 surviving verbatim."""
    jobs = grid(ROOT / "sweeps" / "resflow_hybrid.yaml")
    assert {o for job in jobs for o in job if o.startswith("objective.lam=")} == {
        "objective.lam=0",
        "objective.lam=1/D",
        "objective.lam=1",
    }
