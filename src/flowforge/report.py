"""Published-vs-reproduced tables from the finished runs of one sweep (no training, no model code).

``python -m flowforge.report <multirun dir | wandb:<entity>/<project>[/<group>]> [--out DIR]
[--wandb-project P [--wandb-entity E]]``

For a multirun directory the metrics-by-override summary of :mod:`flowforge.multirun_summary` (``summary.md``,
``summary.csv``: one row per job) is written too; a multirun whose runs carry no ``table`` block gets only that
summary.

Every run of a sweep started from a ``sweeps/`` file carries the file's ``table`` block in its resolved config
(``.hydra/config.yaml``; the W&B run's config)::

    table:
      name: "Residual Flows (Chen et al., 2019), Table 1: test bits/dim"
      metric: test/bpd        # key of metrics.json (W&B: of the run's summary)
      sign: 1                 # reproduced value = sign * metrics[metric] (-1: log-likelihood from test/nll)
      unit: bits/dim          # bits/... -> 3 decimals, nats -> 2 (or set `decimals:`)
      better: lower           # or higher
      columns: [MNIST, CIFAR-10]
      rows: [Real NVP, Residual Flow]
      claim: null             # or a sentence, printed under the table
      claims:                 # optional: the orderings the claim states, checked on the reproduced values
        - {better: Residual Flow, than: Real NVP, columns: all}   # or columns: [MNIST]; or_equal: true for ties
      cells:
        - match: {experiment: resflow_cifar10}   # all must be among the run's overrides (values compared as strings)
          row: Residual Flow
          column: CIFAR-10
          published: 3.28                        # or null
          status: two-copies                     # what backs the published number: see PROVENANCE
          source: "Chen et al. 2019, Table 1"
          quote: "..."                           # required for status paper: the table row and where it is
          recipe: {epochs: 1000, batch_size: 64} # or steps: instead of epochs

A cell's ``status`` says what backs its published number (:data:`PROVENANCE`): ``paper`` (read in the paper's
own text; the cell then carries a ``quote`` of the table row and where it is), ``two-copies``, ``to-verify`` or
``none``.  A table with another status (e.g. ``confirmed``) or a ``paper`` cell without a quote is refused
(:func:`provenance_problem`); the Markdown prints the status beside every published number.

A run belongs to the cell whose ``match`` items are all among its overrides (``cfg.overrides``, else
``.hydra/overrides.yaml``; a leading ``+``/``++`` of an override's key is ignored); when several cells match,
the most specific one (most items) wins.  One report row per cell, in the order of ``rows`` then ``columns``:

* ``done``: finished runs (``metrics.json`` written; W&B state ``finished``).  One run: its value, with
  ``± std`` when ``test/loss_std`` is present (the estimator's standard deviation of the test-set mean, in the
  units of ``test/loss``; converted to the metric's units when the metric is ``test/nll`` or ``test/bpd`` and
  ``test/loss`` equals one of them, times ``|sign|``).  Several runs (seeds): their mean ``± the standard
  deviation over the runs (n=<count>)``.  ``Δ`` is reproduced minus published.
* ``smoke``: finished runs with ``smoke=true`` (tiny models, see :mod:`flowforge.smoke`): not comparable.
* ``incomplete``: runs without ``metrics.json`` (W&B: not finished, or finished without the metric); how far they
  got comes from ``checkpoints/last.ckpt`` (its epochs processed, else its ``epoch``, and ``global_step``; read
  only when torch is importable, ``weights_only``; ``unreadable`` for a truncated file), on W&B from the
  summary's ``epoch`` / ``trainer/global_step``.
* ``not run``: a cell without any run; ``extra``: a run (with this table) that matches no cell.

Each item of ``claims`` says that row ``better`` beats row ``than`` (in the table's ``better`` direction; with
``or_equal: true`` a tie counts too) in each of its ``columns`` (``all``: the table's).  The report prints it under
the table as ``held``, ``not held``, or ``not run`` when a column lacks a ``done`` value on either side
(:func:`evaluate_claim`); unknown rows, columns or keys are refused (:func:`claims_problem`).  Then the table's
recipes (the ``experiment`` of its cells, then of runs matching no cell) with the ``reference`` and ``departures``
blocks their runs' stored configs carry (:func:`recipes`): ``not run`` for a recipe without runs, ``reference not
stated`` for runs without the blocks.

A cell with runs of several kinds gets one row per kind (done, smoke, incomplete).  The Markdown is printed
and written to ``<out>/report.md``; ``<out>/report.csv`` (:data:`CSV_COLUMNS`, one line per row, plain
numbers) next to it, with ``claims.csv`` (:data:`CLAIMS_CSV_COLUMNS`) and ``recipes.csv``
(:data:`RECIPES_CSV_COLUMNS`).  ``<out>`` is the multirun directory (W&B sources: the current directory) unless
``--out DIR``.  ``--wandb-project`` also logs each table as a ``wandb.Table`` (the CSV's columns) to a new W&B
run (``job_type="report"``, name ``report-<table name>``; offline unless ``WANDB_MODE`` says otherwise or an API
key is configured, like the training runs).

This module imports neither Lightning nor torch at import time (torch only to read checkpoints of unfinished
runs; wandb only for W&B sources and uploads), so it runs anywhere the run folders are.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowforge.errors import FlowforgeError
from flowforge.wandb_mode import wandb_mode as _wandb_mode

#: columns of report.csv and of the logged wandb.Table
CSV_COLUMNS = [
    "table",
    "row",
    "column",
    "status",
    "published",
    "published_status",
    "source",
    "reproduced",
    "std",
    "runs",
    "spread",
    "progress",
    "target",
    "progress_unit",
    "difference",
    "unit",
    "overrides",
    "run_ids",
    "note",
]
#: columns of claims.csv (one line per checked claim) and recipes.csv (one line per recipe of a table)
CLAIMS_CSV_COLUMNS = ["table", "better", "than", "columns", "or_equal", "outcome", "missing", "failed"]
RECIPES_CSV_COLUMNS = ["table", "recipe", "runs", "reference", "departures"]
#: Markdown columns
MD_COLUMNS = ["Row", "Column", "Published", "Reproduced", "Trained (run/recipe)", "Δ", "Status"]
DASH = "—"
#: a cell's ``status``: what backs its published number
PROVENANCE = {
    "paper": "read in the paper's own text (the quote below gives the table row and where it is)",
    "two-copies": "two independent secondary copies agree; not read in the paper itself",
    "to-verify": "one copy or none: check against the paper before quoting",
    "none": "no published number (a figure, or a value the paper does not print)",
}
_SKIP_DIRS = {"wandb", "checkpoints", "csv", "figures", "tensorboard", "__pycache__", ".git"}


class ReportError(FlowforgeError, SystemExit):
    """A report source that cannot give a table: the message names the problem and the fix.  A ``SystemExit``, so
    ``python -m flowforge.report`` ends with the message (exit status 1) instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = message  # (Exception's __init__ comes first in the MRO and leaves SystemExit.code None)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One job of a sweep: its resolved config, its final metrics (None unless it finished) and how far it got."""

    id: str  # folder relative to the multirun directory, or the W&B run path
    config: dict
    metrics: dict | None = None
    epochs: float | None = None  # progress known without metrics (checkpoint, W&B summary)
    steps: float | None = None
    note: str = ""  # why it is not finished / how its progress is known

    @property
    def finished(self) -> bool:
        return self.metrics is not None

    @property
    def smoke(self) -> bool:
        return bool(self.config.get("smoke"))

    @property
    def table(self) -> dict | None:
        table = self.config.get("table")
        return table if isinstance(table, dict) else None

    @property
    def overrides(self) -> list[str]:
        return [str(o) for o in (self.config.get("overrides") or [])]

    def progress(self, unit: str) -> float | None:
        """Epochs (``unit="epochs"``) or optimizer steps run."""
        if self.metrics is not None:
            key = "epochs_run" if unit == "epochs" else "global_step"
            if _number(self.metrics.get(key)) is not None:
                return _number(self.metrics.get(key))
        return self.epochs if unit == "epochs" else self.steps


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _natural_key(path: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    return OmegaConf.to_container(cfg, resolve=False), cfg


def _resolved(cfg: Any, key: str, raw: Any) -> Any:
    """``cfg.<key>`` with its interpolations resolved when they can be (the raw value otherwise)."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(cfg, key, throw_on_missing=True)
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception:  # noqa: BLE001 - an unregistered resolver (run_id, now): keep the saved text
        return raw


def _run_config(run_dir: Path) -> dict:
    raw, cfg = _load_yaml(run_dir / ".hydra" / "config.yaml")
    raw = raw if isinstance(raw, dict) else {}
    if isinstance(raw.get("table"), dict):
        raw["table"] = _resolved(cfg, "table", raw["table"])
    trainer = raw.get("trainer")
    if isinstance(trainer, dict):
        for key in ("max_epochs", "max_steps"):
            if key in trainer:
                trainer[key] = _resolved(cfg, f"trainer.{key}", trainer[key])
    if raw.get("overrides") is None:
        path = run_dir / ".hydra" / "overrides.yaml"
        raw["overrides"] = list(_load_yaml(path)[0] or []) if path.is_file() else []
    return raw


def checkpoint_progress(path: Path) -> tuple[float | None, float | None, str]:
    """``(epoch, global_step, note)`` of a Lightning checkpoint; ``note`` is ``"checkpoint unreadable"`` for a
    truncated or foreign file and ``"torch not installed"`` when torch cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None, None, "torch not installed"
    try:
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # an old (non-zip) file cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        epoch = _number(ckpt.get("epoch"))  # the epoch index when it was saved
        try:  # epochs whose training batches all ran (Lightning >= 2): counts an epoch saved at its end
            epoch = _number(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
        except (KeyError, TypeError):
            pass
        return epoch, _number(ckpt.get("global_step")), "checkpoint"
    except Exception:  # noqa: BLE001 - any failure to read it is reported, never raised
        return None, None, "checkpoint unreadable"


def _find_checkpoint(run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    found = list((run_dir / "checkpoints").glob("*.ckpt")) + list(run_dir.glob("hpc_ckpt_*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _hydra_run_dirs(root: Path) -> list[Path]:
    found = []
    for here, dirs, _files in os.walk(root):
        if (Path(here) / ".hydra" / "config.yaml").is_file():
            found.append(Path(here))
        dirs[:] = [d for d in dirs if d != ".hydra" and d not in _SKIP_DIRS]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(root).as_posix()))


def collect_multirun(root: str | os.PathLike) -> list[Run]:
    """The runs under a Hydra multirun directory (job folders found at any depth by their ``.hydra/config.yaml``;
    the directory may also be a single run's folder)."""
    root = Path(root)
    if not root.exists():
        raise ReportError(
            f"{root} does not exist; pass the multirun directory of a sweep (Hydra's "
            "hydra.sweep.dir, e.g. logs/<sweep>/multiruns/<time>) or wandb:<entity>/<project>[/<group>]"
        )
    if not root.is_dir():
        raise ReportError(
            f"{root} is not a directory; pass the multirun directory of a sweep (the folder that holds "
            "the job folders 0/, 1/, ...)"
        )
    runs = []
    for run_dir in _hydra_run_dirs(root):
        rel = run_dir.relative_to(root).as_posix()
        try:
            config = _run_config(run_dir)
        except Exception as e:  # noqa: BLE001
            raise ReportError(
                f"{run_dir / '.hydra' / 'config.yaml'} is not readable YAML ({e}); fix or remove that job folder"
            ) from e
        run = Run(id=rel if rel != "." else run_dir.name, config=config)
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file():
            try:
                run.metrics = json.loads(metrics_path.read_text())
            except (OSError, ValueError):
                run.note = "metrics.json unreadable"
        if run.metrics is None:
            ckpt = _find_checkpoint(run_dir)
            if ckpt is None:
                run.note = run.note or "no checkpoint"
            else:
                run.epochs, run.steps, note = checkpoint_progress(ckpt)
                run.note = run.note or note
        runs.append(run)
    if not runs:
        raise ReportError(
            f"no Hydra run under {root}: no <job>/.hydra/config.yaml found; pass the multirun directory "
            "written by `python train.py -m ...` (hydra.sweep.dir: its job folders 0/, 1/, ... hold "
            ".hydra/config.yaml)"
        )
    return runs


def _mapping(obj: Any) -> dict:
    """A W&B config or summary (``HTTPSummary``, plain dict in tests) as a dict."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    json_dict = getattr(obj, "_json_dict", None)
    if isinstance(json_dict, dict):
        return dict(json_dict)
    try:
        return {k: obj[k] for k in obj.keys()}
    except Exception:  # noqa: BLE001
        return dict(obj)


def _unwrap_config(config: dict) -> dict:
    """W&B configs: values may come as ``{"value": v}``; the table may sit under the module's ``config``
    hyperparameter or under flattened ``table/...`` / ``table.…`` keys."""
    config = {
        k: (v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v)
        for k, v in config.items()
    }
    inner = config.get("config")
    if not isinstance(config.get("table"), dict) and isinstance(inner, dict) and isinstance(inner.get("table"), dict):
        config = {**{k: v for k, v in config.items() if k != "config"}, **inner}
    if not isinstance(config.get("table"), dict):
        nested: dict = {}
        for key, value in config.items():
            for sep in ("/", "."):
                if key.startswith("table" + sep):
                    nested[key[len("table") + 1 :]] = value
        if nested:
            config["table"] = nested
    return config


def collect_wandb(path: str, api: Any = None) -> list[Run]:
    """The runs of ``<entity>/<project>`` (optionally ``/<group>``; a leading ``wandb:`` is dropped) from the W&B
    public API; ``api``: a ``wandb.Api()`` stand-in (anything with ``runs(path, filters=...)``)."""
    path = path[len("wandb:") :] if path.startswith("wandb:") else path
    parts = [p for p in path.split("/") if p]
    if len(parts) not in (2, 3):
        raise ReportError(f"wandb:{path}: expected wandb:<entity>/<project> or wandb:<entity>/<project>/<group>")
    project, group = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    if api is None:
        try:
            import wandb
        except ImportError as e:
            raise ReportError("reading a W&B project needs the wandb package: pip install wandb") from e
        try:
            api = wandb.Api()
        except Exception as e:  # noqa: BLE001
            raise ReportError(
                f"cannot reach the W&B API ({e}); log in with `wandb login` (or set WANDB_API_KEY), "
                "or report from the multirun directory instead"
            ) from e
    try:
        found = list(api.runs(project, filters={"group": group} if group else None))
    except Exception as e:  # noqa: BLE001
        raise ReportError(
            f"cannot list the runs of wandb:{path} ({e}); check the entity/project name and "
            "that you are logged in (wandb login)"
        ) from e
    runs = []
    for wb in found:
        config = _unwrap_config(_mapping(getattr(wb, "config", None)))
        summary = _mapping(getattr(wb, "summary", None))
        state = str(getattr(wb, "state", "") or "unknown")
        run_path = getattr(wb, "path", None)
        run_id = (
            "/".join(run_path)
            if isinstance(run_path, (list, tuple))
            else str(getattr(wb, "name", None) or getattr(wb, "id", "?"))
        )
        run = Run(
            id=run_id,
            config=config,
            metrics=summary if state == "finished" else None,
            note="" if state == "finished" else state,
        )
        # how far it got: our final metrics, else what Lightning logged along the way
        run.epochs = _number(summary.get("epochs_run", summary.get("epoch")))
        run.steps = _number(summary.get("global_step", summary.get("trainer/global_step")))
        runs.append(run)
    if not runs:
        raise ReportError(f"no runs in wandb:{path}; check the entity, project and group names")
    runs.sort(key=lambda r: _natural_key(r.id))
    return runs


def collect(source: str, api: Any = None) -> list[Run]:
    """Runs of a multirun directory or of ``wandb:<entity>/<project>[/<group>]``."""
    if str(source).startswith("wandb:"):
        return collect_wandb(str(source), api=api)
    return collect_multirun(source)


# ---------------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    """One published table: its ``table`` block and the report rows (dicts keyed by :data:`CSV_COLUMNS`)."""

    spec: dict
    rows: list[dict] = field(default_factory=list)
    runs: int = 0
    recipes: list[dict] = field(default_factory=list)  # :func:`recipes`
    claims: list[dict] = field(default_factory=list)  # :func:`evaluate_claim` of each item of ``claims``

    @property
    def name(self) -> str:
        return str(self.spec.get("name"))

    @property
    def decimals(self) -> int:
        if self.spec.get("decimals") is not None:
            return int(self.spec["decimals"])
        unit = str(self.spec.get("unit") or "").lower()
        return 2 if "nat" in unit else 3


def _override_items(overrides: Iterable[str]) -> set[tuple[str, str]]:
    items = set()
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep:
            items.add((key.lstrip("+"), value))
    return items


def _as_override_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _match_items(cell: dict) -> set[tuple[str, str]]:
    return {(str(k), _as_override_value(v)) for k, v in (cell.get("match") or {}).items()}


def _check_spec(spec: dict, run: Run, source: str) -> None:
    missing = [k for k in ("name", "metric", "cells") if not spec.get(k)]
    if missing or not isinstance(spec.get("cells"), list):
        raise ReportError(
            f"the table block of run {run.id} in {source} lacks {', '.join(missing) or 'a cells list'}; "
            "fix the sweep file's table block (name, metric, sign, unit, rows, columns, cells)"
        )
    for i, cell in enumerate(spec["cells"]):
        if not isinstance(cell, dict) or not isinstance(cell.get("match"), dict) or not cell.get("match"):
            raise ReportError(
                f"cell {i} of table {spec['name']!r} (run {run.id} in {source}) has no `match` mapping "
                "of overrides; give every cell e.g. match: {experiment: <name>}"
            )
        problem = provenance_problem(cell)
        if problem:
            raise ReportError(
                f"cell {cell.get('row')!r} / {cell.get('column')!r} of table {spec['name']!r} (run "
                f"{run.id} in {source}): {problem}; fix the sweep file's cell and rerun, or edit "
                "the run's .hydra/config.yaml"
            )
    problem = claims_problem(spec)
    if problem:
        raise ReportError(
            f"table {spec['name']!r} (run {run.id} in {source}): {problem}; fix the sweep file's "
            "`claims` and rerun, or edit the run's .hydra/config.yaml"
        )


def provenance_problem(cell: dict) -> str | None:
    """What is wrong with a cell's provenance (``status``, ``published``, ``quote``), or None: the status is one of
    :data:`PROVENANCE`, a ``paper`` cell quotes the paper (a non-empty ``quote``), a ``none`` cell has no number
    and ``paper`` / ``two-copies`` cells have one."""
    status, published, quote = cell.get("status"), cell.get("published"), cell.get("quote")
    if status not in PROVENANCE:
        return (
            f"status {status!r} is not one of {', '.join(PROVENANCE)} (nothing is 'confirmed' without a quote "
            "of the paper: status paper with quote:, else two-copies, to-verify or none)"
        )
    if status == "paper" and not (isinstance(quote, str) and quote.strip()):
        return "status paper needs a `quote:` of the paper's table row and where it is"
    if quote is not None and not (isinstance(quote, str) and quote.strip()):
        return "`quote:` must be a non-empty string"
    if status == "none" and published is not None:
        return f"status none with a published number ({published}); say what backs it"
    if status in ("paper", "two-copies") and published is None:
        return f"status {status} without a published number"
    return None


#: keys of one item of a table's ``claims`` list (``or_equal`` is optional, default false)
CLAIM_KEYS = ("better", "than", "columns", "or_equal")
_CLAIM_FORM = "{better: <row>, than: <row>, columns: all | [<column>, ...], or_equal: false}"


def _claim_problem(claim: Any, rows: Sequence[str], columns: Sequence[str], places: set[tuple[Any, Any]]) -> str | None:
    """What is wrong with one item of ``claims`` (``places``: the table's (row, column) cells), or None."""
    if not isinstance(claim, dict):
        return f"{claim!r} is not a mapping {_CLAIM_FORM}"
    unknown = sorted(set(claim) - set(CLAIM_KEYS))
    if unknown:
        return f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(CLAIM_KEYS)})"
    for key in ("better", "than"):
        if claim.get(key) not in rows:
            return f"{key}: {claim.get(key)!r} is not one of the table's rows ({', '.join(map(str, rows))})"
    if claim["better"] == claim["than"]:
        return f"better and than name the same row {claim['better']!r}"
    chosen = claim.get("columns")
    if chosen != "all":
        if not isinstance(chosen, list) or not chosen:
            return f"columns: {chosen!r} is neither `all` nor a non-empty list of the table's columns"
        bad = [c for c in chosen if c not in columns]
        if bad:
            return (
                f"columns {', '.join(map(repr, bad))} are not among the table's columns "
                f"({', '.join(map(str, columns))})"
            )
    for column in columns if chosen == "all" else chosen:
        lacking = [row for row in (claim["better"], claim["than"]) if (row, column) not in places]
        if lacking:
            return f"row {lacking[0]!r} has no cell in column {column!r}, so the claim could never be settled"
    if not isinstance(claim.get("or_equal", False), bool):
        return f"or_equal: {claim['or_equal']!r} is not true or false"
    return None


def claims_problem(spec: dict) -> str | None:
    """What is wrong with a table's ``claims`` list, or None (no list is fine): each item orders two of the table's
    ``rows`` in each of its ``columns`` (``all`` or a list of the table's columns), in the table's ``better``
    direction; ``or_equal: true`` also accepts a tie."""
    claims = spec.get("claims")
    if claims is None:
        return None
    if not isinstance(claims, list) or not claims:
        return f"`claims` must be a non-empty list of {_CLAIM_FORM}"
    if spec.get("better") not in ("lower", "higher"):
        return f"`claims` need the table's `better: lower` or `better: higher` (it is {spec.get('better')!r})"
    rows, columns = list(spec.get("rows") or []), list(spec.get("columns") or [])
    places = {(c.get("row"), c.get("column")) for c in spec.get("cells") or [] if isinstance(c, dict)}
    for i, claim in enumerate(claims):
        problem = _claim_problem(claim, rows, columns, places)
        if problem:
            return f"claim {i}: {problem}"
    return None


def _ordered_cells(spec: dict) -> list[dict]:
    rows, columns = list(spec.get("rows") or []), list(spec.get("columns") or [])
    cells = list(spec["cells"])

    def key(item: tuple[int, dict]) -> tuple:
        i, cell = item
        r = rows.index(cell.get("row")) if cell.get("row") in rows else len(rows)
        c = columns.index(cell.get("column")) if cell.get("column") in columns else len(columns)
        return r, c, i

    return [cell for _, cell in sorted(enumerate(cells), key=key)]


def _value(run: Run, spec: dict) -> tuple[float | None, float | None]:
    """``(sign * metric, its estimator std)`` of a finished run (None where absent)."""
    metrics, metric = run.metrics or {}, str(spec["metric"])
    sign = _number(spec.get("sign"))
    sign = 1.0 if sign is None else sign
    value = _number(metrics.get(metric))
    if value is None:
        return None, None
    std, loss = _number(metrics.get("test/loss_std")), _number(metrics.get("test/loss"))
    if std is not None and metric != "test/loss" and loss is not None and not math.isclose(value, loss, rel_tol=1e-9):
        other = {"test/nll": "test/bpd", "test/bpd": "test/nll"}.get(metric)
        if (
            other
            and loss
            and _number(metrics.get(other)) is not None
            and math.isclose(loss, _number(metrics.get(other)), rel_tol=1e-9)
        ):
            std = std * abs(value / loss)  # bits/dim and nats are proportional
        else:
            std = None  # test/loss is in other units than the metric
    return sign * value, (abs(sign) * std if std is not None else None)


def _target(cell: dict, runs: Sequence[Run]) -> tuple[float | None, str]:
    recipe = cell.get("recipe") or {}
    if isinstance(recipe, dict):
        if _number(recipe.get("epochs")) is not None:
            return _number(recipe["epochs"]), "epochs"
        if _number(recipe.get("steps")) is not None:
            return _number(recipe["steps"]), "steps"
    for run in runs:  # no recipe: the run's own trainer settings
        trainer = run.config.get("trainer") or {}
        if (_number(trainer.get("max_steps")) or -1) > 0 and _number(trainer.get("max_epochs")) is None:
            return _number(trainer["max_steps"]), "steps"
        if _number(trainer.get("max_epochs")) is not None:
            return _number(trainer["max_epochs"]), "epochs"
    return None, "epochs"


def _row(
    spec: dict, cell: dict, status: str, runs: Sequence[Run], target: float | None, unit: str, overrides: str
) -> dict:
    row = {c: None for c in CSV_COLUMNS}
    published = _number(cell.get("published"))
    row.update(
        table=str(spec["name"]),
        row=str(cell.get("row", "")),
        column=str(cell.get("column", "")),
        status=status,
        published=published,
        published_status=str(cell.get("status") or ""),
        source=str(cell.get("source") or ""),
        runs=len(runs),
        target=target,
        progress_unit=unit,
        unit=str(spec.get("unit") or ""),
        overrides=overrides,
        run_ids=";".join(r.id for r in runs),
        note="",
    )
    progress = [p for p in (r.progress(unit) for r in runs) if p is not None]
    row["progress"] = min(progress) if progress else None
    row["_progress_max"] = max(progress) if progress else None
    if status in ("done", "smoke", "extra") and all(r.finished for r in runs) and runs:
        values = [_value(r, spec) for r in runs]
        if any(v is None for v, _ in values):
            row["note"] = f"no finite {spec['metric']} in the metrics"
        else:
            row["reproduced"] = statistics.fmean(v for v, _ in values)
            stds = [s for _, s in values]
            if all(s is not None for s in stds):
                row["std"] = math.sqrt(sum(s * s for s in stds)) / len(stds)
            if len(values) > 1:
                row["spread"] = statistics.stdev(v for v, _ in values)
            if status == "done" and published is not None:
                row["difference"] = row["reproduced"] - published
    if status == "incomplete" or (status == "extra" and not all(r.finished for r in runs)):
        notes = list(dict.fromkeys(r.note or "?" for r in runs))
        row["note"] = "; ".join(n for n in notes if n != "checkpoint")
    if status == "smoke":
        row["note"] = "smoke=true: not comparable"
    return row


def _reproduced(rows: Sequence[dict], row: str, column: str) -> float | None:
    """The reproduced value of a cell's finished, comparable (``done``) runs, or None."""
    for r in rows:
        if r["status"] == "done" and r["row"] == row and r["column"] == column and r["reproduced"] is not None:
            return r["reproduced"]
    return None


def evaluate_claim(claim: dict, spec: dict, rows: Sequence[dict]) -> dict:
    """One claim (an item of ``claims``, see :func:`claims_problem`) on a table's report rows: ``outcome`` is
    ``held`` (row ``better`` beats row ``than`` in every column of the claim, in the table's ``better`` direction),
    ``not held`` (some column has both values and the ordering fails there: one counterexample settles it) or
    ``not run`` (no failing column, but a column lacks a ``done`` value on either side; ``missing`` names them);
    ``failed`` names the columns where it does not hold and ``held_in`` those where it does."""
    columns = list(spec.get("columns") or []) if claim["columns"] == "all" else list(claim["columns"])
    sign = 1.0 if spec["better"] == "lower" else -1.0
    missing, failed, held_in = [], [], []
    for column in columns:
        a, b = _reproduced(rows, claim["better"], column), _reproduced(rows, claim["than"], column)
        if a is None or b is None:
            missing.append(column)
        elif not (sign * (b - a) > 0 or (claim.get("or_equal", False) and a == b)):
            failed.append(column)
        else:
            held_in.append(column)
    outcome = "not held" if failed else "not run" if missing else "held"
    return {
        "claim": claim,
        "columns": columns,
        "outcome": outcome,
        "missing": missing,
        "failed": failed,
        "held_in": held_in,
    }


def _experiment(run: Run) -> str | None:
    """The recipe a run composed: its ``experiment=`` override."""
    return dict(_override_items(run.overrides)).get("experiment")


def recipes(spec: dict, runs: Sequence[Run]) -> list[dict]:
    """The recipes of a table (the ``experiment`` of its cells' ``match``, then those of runs matching no cell) with
    the ``reference`` and ``departures`` blocks of their runs' stored configs (the first run that has them): one dict
    per recipe with ``recipe``, ``runs`` (count), ``reference`` and ``departures`` (None when not stated)."""
    names = [str(c["match"]["experiment"]) for c in _ordered_cells(spec) if "experiment" in c["match"]]
    names += [e for e in map(_experiment, runs) if e is not None]
    found = []
    for name in dict.fromkeys(names):
        members = [r for r in runs if _experiment(r) == name]
        stated = next((r.config for r in members if r.config.get("reference") is not None), {})
        found.append(
            {
                "recipe": name,
                "runs": len(members),
                "reference": stated.get("reference"),
                "departures": stated.get("departures"),
            }
        )
    return found


def build_tables(runs: Sequence[Run], source: str = "") -> list[Table]:
    """Group runs by their table block (one table per ``table.name``, in the order first met) and build the rows."""
    tables: dict[str, Table] = {}
    members: dict[str, list[Run]] = {}
    for run in runs:
        if run.table is None:
            continue
        _check_spec(run.table, run, source)
        name = str(run.table["name"])
        tables.setdefault(name, Table(spec=run.table))
        members.setdefault(name, []).append(run)
    if not tables:
        raise ReportError(
            f"none of the {len(runs)} runs in {source or 'the source'} has a `table` block in its "
            "config; "
            "was this sweep run from a sweeps/ file with a table block? (python train.py -m "
            "--config-dir sweeps --config-name <sweep>)"
        )
    for name, table in tables.items():
        spec, table.runs = table.spec, len(members[name])
        cells = _ordered_cells(spec)
        by_cell: dict[int, list[Run]] = {id(c): [] for c in cells}
        extras: list[Run] = []
        for run in members[name]:
            have = _override_items(run.overrides)
            matching = [c for c in cells if _match_items(c) <= have]
            if matching:
                best = max(len(_match_items(c)) for c in matching)
                by_cell[id(next(c for c in matching if len(_match_items(c)) == best))].append(run)
            else:
                extras.append(run)
        for cell in cells:
            cell_runs = by_cell[id(cell)]
            target, unit = _target(cell, cell_runs)
            match = " ".join(f"{k}={v}" for k, v in sorted(_match_items(cell)))
            groups = [
                ("done", [r for r in cell_runs if r.finished and not r.smoke]),
                ("smoke", [r for r in cell_runs if r.finished and r.smoke]),
                ("incomplete", [r for r in cell_runs if not r.finished]),
            ]
            groups = [(s, rs) for s, rs in groups if rs] or [("not run", [])]
            for status, group in groups:
                row = _row(spec, cell, status, group, target, unit, match)
                if status == "done" and row["reproduced"] is None:  # finished without the metric (test=false?)
                    row["status"] = "incomplete"
                table.rows.append(row)
        for run in extras:
            cell = {"row": "extra", "column": "", "published": None, "status": "", "source": ""}
            target, unit = _target(cell, [run])
            row = _row(spec, cell, "extra", [run], target, unit, " ".join(run.overrides))
            row["note"] = "; ".join(
                n for n in (row["note"], "smoke" if run.smoke else "", "" if run.finished else "incomplete") if n
            )
            table.rows.append(row)
        table.recipes = recipes(spec, members[name])
        table.claims = [evaluate_claim(c, spec, table.rows) for c in spec.get("claims") or []]
    return list(tables.values())


# ---------------------------------------------------------------------------------------------- output
def _num(value: float | None, decimals: int) -> str:
    return DASH if value is None else f"{value:.{decimals}f}"


def _count(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _published(value: float | None) -> str:
    return DASH if value is None else f"{value:g}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(row: dict, decimals: int) -> list[str]:
    published = _published(row["published"])
    if row["published_status"] and (row["published"] is not None or row["published_status"] != "none"):
        published += f" ({row['published_status']})"
    reproduced = _num(row["reproduced"], decimals)
    if row["reproduced"] is not None:
        if row["runs"] > 1:
            reproduced += f" ± {row['spread']:.{decimals}f} (n={row['runs']})"
        elif row["std"] is not None:
            reproduced += f" ± {row['std']:.{decimals}f}"
    if row["status"] == "not run" and row["target"] is None:
        trained = DASH
    else:
        done = "" if row["status"] == "not run" else _count(row["progress"])
        if row["_progress_max"] is not None and row["_progress_max"] != row["progress"]:
            done += f"–{_count(row['_progress_max'])}"
        trained = f"{done or DASH}/{_count(row['target'])} {row['progress_unit']}"
    status = row["status"]
    if status == "incomplete" and row["runs"] > 1:
        status += f" ({row['runs']} runs)"
    if row["note"] and status not in ("smoke",):
        status += f": {row['note']}"
    column = f"`{row['overrides']}`" if row["status"] == "extra" else row["column"]
    difference = DASH if row["difference"] is None else f"{row['difference']:+.{decimals}f}"
    return [_md_escape(c) for c in (row["row"], column, published, reproduced, trained, difference, status)]


def _inline(value: Any) -> str:
    """A YAML value on one line: a mapping as ``key: value`` pairs, a list comma-separated, whitespace collapsed."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_inline(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_inline(v) for v in value)
    return " ".join(str(value).split())


def _departure(item: Any) -> str:
    if isinstance(item, dict) and "key" in item:
        reason = f": {_inline(item['reason'])}" if item.get("reason") is not None else ""
        return f"departure `{item['key']}`{reason}"
    return f"departure: {_inline(item)}"


def _recipe_lines(recipe: dict) -> list[str]:
    """One recipe under a table (Markdown list lines): its reference, then one sub-item per departure; ``not run``
    or ``reference not stated`` instead when so."""
    head = f"- `{recipe['recipe']}`"
    if not recipe["runs"]:
        return [f"{head}: not run"]
    head += f" ({recipe['runs']} run{'s' if recipe['runs'] != 1 else ''})"
    reference, departures = recipe["reference"], recipe["departures"]
    if isinstance(reference, dict):
        head += ": " + "; ".join(f"{k}: {_inline(v)}" for k, v in reference.items())
    else:
        head += f": reference: {_inline(reference)}" if reference is not None else ": reference not stated"
    if isinstance(departures, list) and departures:
        return [head] + [f"  - {_departure(d)}" for d in departures]
    if reference is not None or departures is not None:
        head += "; no departures stated"
    return [head]


def _claim_line(result: dict, columns: Sequence[str]) -> str:
    """One evaluated claim: the ordering it states and ``held`` / ``not held`` / ``not run``."""
    claim = result["claim"]
    relation = "at least as good as" if claim.get("or_equal", False) else "better than"
    where = "every column" if result["columns"] == list(columns) else ", ".join(result["columns"])
    line = f"{claim['better']} {relation} {claim['than']} in {where}: {result['outcome']}"
    notes = []
    if result["failed"]:
        notes.append(f"fails in {', '.join(result['failed'])}")
    if result["missing"]:
        notes.append(f"no finished value on both sides in {', '.join(result['missing'])}")
    if result["missing"] and result.get("held_in"):
        notes.append(f"holds in {', '.join(result['held_in'])}")
    return line + (f" ({'; '.join(notes)})" if notes else "")


def render_markdown(tables: Sequence[Table]) -> str:
    """The report: per table a heading, the metric line, the Markdown table, the claim and the footnotes."""
    parts = []
    for table in tables:
        spec, d = table.spec, table.decimals
        sign = _number(spec.get("sign"))
        metric = f"{'-' if sign is not None and sign < 0 else ''}{spec['metric']}"
        better = f", {spec['better']} is better" if spec.get("better") else ""
        unit = f" ({spec['unit']}{better})" if spec.get("unit") else (f" ({better[2:]})" if better else "")
        lines = [
            f"## {spec['name']}",
            "",
            f"Reproduced: {metric}{unit}, from {table.runs} run{'s' if table.runs != 1 else ''}.",
            "",
        ]
        lines.append("| " + " | ".join(MD_COLUMNS) + " |")
        lines.append("|" + "|".join(["---"] * len(MD_COLUMNS)) + "|")
        lines += ["| " + " | ".join(_md_row(row, d)) + " |" for row in table.rows]
        if spec.get("claim"):
            lines += ["", f"Claim: {spec['claim']}"]
        if table.claims:
            lines += ["", "Claims checked on the reproduced values:", ""]
            lines += [f"- {_claim_line(c, spec.get('columns') or [])}" for c in table.claims]
        if table.recipes:
            lines += ["", "Recipes (reference and departures from the runs' stored configs):", ""]
            lines += [line for r in table.recipes for line in _recipe_lines(r)]
        notes = []
        statuses = {r["status"] for r in table.rows}
        if any(r["std"] is not None and r["runs"] == 1 and r["reproduced"] is not None for r in table.rows):
            notes.append(
                "± after a single run: the estimator's standard deviation of the test-set mean (test/loss_std)."
            )
        if any(r["runs"] > 1 and r["reproduced"] is not None for r in table.rows):
            notes.append(
                "± (n=k): the standard deviation over the k runs (seeds) of the cell; the value is their mean."
            )
        if "smoke" in statuses or any("smoke" in (r["note"] or "") for r in table.rows if r["status"] == "extra"):
            notes.append(
                "smoke: run with smoke=true (tiny model and data, flowforge.smoke); its numbers are not "
                "comparable with the published ones."
            )
        if "incomplete" in statuses:
            notes.append(
                "incomplete: the run has not written its final metrics (no metrics.json / W&B run not "
                "finished); Trained shows how far it got."
            )
        if "extra" in statuses:
            notes.append("extra: a run of this sweep whose overrides match no cell of the table.")
        shown = {r["published_status"] for r in table.rows if r["published_status"]} - {"none"}
        notes += [f"({status}): {PROVENANCE[status]}." for status in PROVENANCE if status in shown]
        notes += [
            f'{c["row"]} / {c["column"]}, quoted: "{c["quote"]}"'
            for c in _ordered_cells(spec)
            if c.get("status") == "paper"
            and any(r["row"] == c.get("row") and r["column"] == c.get("column") for r in table.rows)
        ]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        value = round(value, 6)
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def csv_rows(tables: Sequence[Table]) -> list[list[Any]]:
    """The rows of report.csv (and of the wandb.Table): :data:`CSV_COLUMNS` values, None where empty."""
    return [[row[c] for c in CSV_COLUMNS] for table in tables for row in table.rows]


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for values in rows:
        writer.writerow([_csv_value(v) for v in values])
    return buf.getvalue()


def render_csv(tables: Sequence[Table]) -> str:
    return _csv_text(CSV_COLUMNS, csv_rows(tables))


def render_claims_csv(tables: Sequence[Table]) -> str:
    """claims.csv: :data:`CLAIMS_CSV_COLUMNS`, one line per checked claim; lists of columns joined by ``;``."""
    return _csv_text(
        CLAIMS_CSV_COLUMNS,
        [
            [
                t.name,
                c["claim"]["better"],
                c["claim"]["than"],
                ";".join(c["columns"]),
                str(bool(c["claim"].get("or_equal", False))).lower(),
                c["outcome"],
                ";".join(c["missing"]),
                ";".join(c["failed"]),
            ]
            for t in tables
            for c in t.claims
        ],
    )


def render_recipes_csv(tables: Sequence[Table]) -> str:
    """recipes.csv: :data:`RECIPES_CSV_COLUMNS`, one line per recipe of a table; ``reference`` and ``departures`` as
    JSON (empty when not stated)."""

    def as_json(value: Any) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False)

    return _csv_text(
        RECIPES_CSV_COLUMNS,
        [
            [t.name, r["recipe"], r["runs"], as_json(r["reference"]), as_json(r["departures"])]
            for t in tables
            for r in t.recipes
        ],
    )


def log_to_wandb(
    tables: Sequence[Table],
    project: str,
    entity: str | None = None,
    dir: str | os.PathLike | None = None,
    source: str = "",
) -> list[str]:  # noqa: A002
    """Log each table as a ``wandb.Table`` (key ``report``, the CSV's columns) in a new run (job_type ``report``,
    name ``report-<table name>``); returns the runs' local folders."""
    import wandb

    folders = []
    for table in tables:
        data = [
            [
                (int(v) if c == "runs" else float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for c, v in zip(CSV_COLUMNS, values)
            ]
            for values in csv_rows([table])
        ]
        run = wandb.init(
            project=project,
            entity=entity,
            job_type="report",
            name=f"report-{table.name}",
            mode=_wandb_mode(),
            dir=str(dir) if dir is not None else None,
            reinit="create_new",
            config={"source": str(source), "table": table.spec},
        )
        try:
            run.log({"report": wandb.Table(columns=list(CSV_COLUMNS), data=data, allow_mixed_types=True)})
            folders.append(str(Path(run.dir).parent))
        finally:
            run.finish()
    if wandb.run is None:  # finish() returns before the service has written the run's records: wait for it
        wandb.teardown()
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowforge.report",
        description="Published-vs-reproduced table(s) of one sweep: prints Markdown, writes report.md and report.csv.",
    )
    parser.add_argument(
        "source", help="multirun directory of a sweep (python train.py -m ...), or wandb:<entity>/<project>[/<group>]"
    )
    parser.add_argument(
        "--out",
        help="folder for report.md / report.csv (default: the multirun directory; "
        "the current directory for W&B sources)",
    )
    parser.add_argument("--wandb-project", help="also log the table(s) as a wandb.Table to a new run of this project")
    parser.add_argument("--wandb-entity", help="W&B entity of --wandb-project")
    args = parser.parse_args(argv)

    runs = collect(args.source)
    out = Path(args.out) if args.out else (Path.cwd() if args.source.startswith("wandb:") else Path(args.source))
    local = not args.source.startswith("wandb:")
    if local and not any(run.table is not None for run in runs):  # a plain multirun: the metrics-by-override table
        from flowforge.multirun_summary import summarize

        sys.stdout.write(summarize(args.source, out))
        sys.stdout.flush()
        print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}", file=sys.stderr)
        return 0
    tables = build_tables(runs, source=args.source)
    markdown = render_markdown(tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    (out / "report.csv").write_text(render_csv(tables))
    (out / "claims.csv").write_text(render_claims_csv(tables))
    (out / "recipes.csv").write_text(render_recipes_csv(tables))
    sys.stdout.write(markdown)
    sys.stdout.flush()
    written = ", ".join(str(out / name) for name in ("report.md", "report.csv", "claims.csv", "recipes.csv"))
    print(f"wrote {written}", file=sys.stderr)
    if local:
        from flowforge.multirun_summary import summarize

        summarize(args.source, out)
        print(f"wrote {out / 'summary.md'}, {out / 'summary.csv'}", file=sys.stderr)
    if args.wandb_project:
        for folder in log_to_wandb(tables, args.wandb_project, args.wandb_entity, dir=out, source=args.source):
            print(f"logged the table to W&B run {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
