"""Metrics-by-override table of any Hydra multirun (``python train.py -m a=1,2 b=x,y``).

:func:`summarize` reads every job folder of a multirun directory (found by its ``.hydra/config.yaml``) and writes
``summary.md`` and ``summary.csv`` into that directory: one row per job, in job order, with

* ``job``: the job's folder relative to the multirun directory;
* the override keys whose values differ between jobs (all override keys when none differ), a leading
  ``+``/``++``/``~`` dropped;
* ``status``: ``finished`` (``metrics.json`` written), ``running`` (the job still holds its run lock), else the
  ``status`` recorded in the job's ``status.json`` when there is one, else ``failed``;
* the main metrics from ``metrics.json``: every ``test/*`` key, ``val/loss``, ``epochs_run`` and ``global_step``
  (empty for jobs without metrics: a failed job is a row, never dropped).

:class:`SummaryCallback` (registered under ``hydra.callbacks`` in ``conf/hydra/default.yaml``) calls it at the end
of every multirun and prints the Markdown; a failure to summarise is printed and never fails the sweep.
``python -m flowforge.report <multirun dir>`` writes the same summary for a sweep without a ``table`` block.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

#: the run lock a training job holds in its folder (flowforge.training.run_lock.LOCK_NAME; not imported, so that
#: the summary needs no Lightning)
LOCK_NAME = ".flowforge.lock"
#: metrics shown after the ``test/*`` keys, when any job has them
TAIL_METRICS = ("val/loss", "epochs_run", "global_step")


def _override_key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _job_status(run_dir: Path, finished: bool) -> str:
    if finished:
        return "finished"
    lock = run_dir / LOCK_NAME
    if lock.is_file():
        try:
            pid = int(json.loads(lock.read_text()).get("pid"))
            os.kill(pid, 0)
            return "running"
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    status_file = run_dir / "status.json"
    if status_file.is_file():
        try:
            recorded = json.loads(status_file.read_text())
            status = recorded.get("status") if isinstance(recorded, dict) else None
            if status:
                error = recorded.get("error")
                return f"{status}: {' '.join(str(error).split())[:120]}" if error else str(status)
        except (OSError, ValueError):
            pass
    return "failed"


def _job_label(run_id: str) -> str:
    """A job's number for a ``<number>_<overrides>`` folder (its overrides have their own columns), else the folder."""
    head = run_id.split("_", 1)[0]
    return head if head.isdigit() else run_id


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summary_table(root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """``(columns, rows)`` of the summary of the multirun directory ``root`` (all cells as text, ``""`` when
    empty)."""
    from flowforge.report import collect_multirun

    root = Path(root)
    runs = collect_multirun(root)
    items = [dict(_override_key_value(o) for o in run.overrides) for run in runs]
    keys: list[str] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    varying = [k for k in keys if len({item.get(k) for item in items}) > 1] or keys
    metric_keys = sorted({k for run in runs for k in (run.metrics or {}) if k.startswith("test/")})
    metric_keys += [k for k in TAIL_METRICS if any(k in (run.metrics or {}) for run in runs)]
    columns = ["job", *varying, "status", *metric_keys]
    rows = []
    for run, item in zip(runs, items):
        run_dir = root / run.id if (root / run.id).is_dir() else root
        metrics = run.metrics or {}
        status = _job_status(run_dir, run.finished)
        rows.append(
            [
                _job_label(run.id),
                *(item.get(k, "") for k in varying),
                status,
                *(_cell(metrics.get(k)) for k in metric_keys),
            ]
        )
    return columns, rows


def render_markdown(columns: list[str], rows: list[list[str]], title: str = "") -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(esc(c) for c in columns) + " |")
    lines.append("|" + "|".join(["---"] * len(columns)) + "|")
    lines += ["| " + " | ".join(esc(c) or "—" for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_csv(columns: list[str], rows: list[list[str]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue()


def summarize(root: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Write ``summary.md`` and ``summary.csv`` for the multirun directory ``root`` into ``out`` (default:
    ``root``); returns the Markdown."""
    root = Path(root)
    out = Path(out) if out is not None else root
    columns, rows = summary_table(root)
    markdown = render_markdown(columns, rows, title=f"Multirun summary: {root}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown)
    (out / "summary.csv").write_text(render_csv(columns, rows))
    return markdown


try:  # Hydra is a dependency of the experiment layer; the table itself needs only the run folders
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class SummaryCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback: at the end of a multirun, write and print the summary of ``hydra.sweep.dir``.  Any error
    while summarising is printed (with the command that retries it) and never changes the sweep's outcome."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = None
        try:
            root = Path(str(config.hydra.sweep.dir))
            markdown = summarize(root)
            sys.stdout.write("\n" + markdown)
            print(f"summary: {root / 'summary.md'}, {root / 'summary.csv'}", flush=True)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a summary must never turn a finished sweep into a failure
            print(
                f"no multirun summary ({type(e).__name__}: {e}); retry with: python -m flowforge.report {root}",
                file=sys.stderr,
                flush=True,
            )
