"""Reference posteriors of the sbibm tasks' ten standard observations.

The sbibm package ships, for each task and observation ``k = 1..10``, the files

    sbibm/tasks/<task>/files/num_observation_<k>/observation.csv                 (header data_1..data_D, one row)
    sbibm/tasks/<task>/files/num_observation_<k>/true_parameters.csv             (header parameter_1.., one row)
    sbibm/tasks/<task>/files/num_observation_<k>/reference_posterior_samples.csv.bz2   (header, 10000 rows)

They are read from ``<data_dir>/sbibm/tasks/...`` (the sbibm wheel unpacked into ``data_dir``:
``pip download sbibm --no-deps`` and unzip it there), or from an installed sbibm package (found with
``importlib.util.find_spec``, never imported: its dependencies are heavy).  Tasks with a closed-form posterior
(:attr:`flowforge.sbi.tasks.Task.analytic`) need no files: without them, their observations are simulated from
parameters drawn from the prior with fixed seeds and the reference samples are exact posterior draws.
"""

from __future__ import annotations

import bz2
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowforge.errors import DataError
from flowforge.sbi.tasks import Task

NUM_OBSERVATIONS = 10
#: the number of reference posterior samples sbibm stores per observation
NUM_REFERENCE_SAMPLES = 10000
HOW_TO_GET = (
    "Get them with `pip download sbibm==1.1.0 --no-deps` and unzip the wheel into dataset.data_dir (so that it holds "
    "sbibm/tasks/<task>/files/num_observation_<k>/), or `pip install sbibm`"
)


@dataclass
class PosteriorReference:
    """The observations ``x_o`` (``(K, dim_x)``), their true parameters (``(K, dim_theta)``) and reference posterior
    samples (a list of ``K`` tensors ``(n_ref, dim_theta)``), and where they came from (``source``)."""

    observations: Tensor
    true_parameters: Tensor
    samples: list[Tensor]
    source: str


def sbibm_roots(data_dir: str | Path | None) -> list[Path]:
    """Folders that may hold ``sbibm/tasks``: ``data_dir`` first, then the installed package's parent folder."""
    roots = [] if data_dir is None else [Path(data_dir)]
    spec = importlib.util.find_spec("sbibm")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p).parent for p in spec.submodule_search_locations]
    return roots


def task_files(task: str, data_dir: str | Path | None) -> Path | None:
    """``.../sbibm/tasks/<task>/files`` of the first root that has it, or None."""
    for root in sbibm_roots(data_dir):
        folder = root / "sbibm" / "tasks" / task / "files"
        if folder.is_dir():
            return folder
    return None


def read_csv(path: Path, prefix: str, columns: int, rows: int | None = None) -> Tensor:
    """A sbibm csv (optionally ``.bz2``): a header ``<prefix>_1,...,<prefix>_<columns>`` and rows of numbers, as a
    float32 tensor ``(n, columns)``; a :class:`DataError` naming the file for anything else."""
    if not path.is_file():
        raise DataError(f"sbibm file {path} does not exist. {HOW_TO_GET}")
    try:
        raw = bz2.decompress(path.read_bytes()) if path.suffix == ".bz2" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, ValueError) as e:
        raise DataError(f"sbibm file {path} cannot be read ({e}); it is corrupt. {HOW_TO_GET}") from None
    header, _, body = text.partition("\n")
    expected = [f"{prefix}_{i + 1}" for i in range(columns)]
    if [h.strip() for h in header.split(",")] != expected:
        raise DataError(
            f"sbibm file {path} has the header {header.strip()[:120]!r}; expected {columns} columns "
            f"{expected[0]}..{expected[-1]} (a file of another task?). {HOW_TO_GET}"
        )
    try:
        values = np.loadtxt(io.StringIO(body), delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"sbibm file {path} has malformed rows ({e}); it is corrupt. {HOW_TO_GET}") from None
    if values.shape[0] == 0 or values.shape[1] != columns or (rows is not None and values.shape[0] != rows):
        want = f"{rows} rows of {columns}" if rows is not None else f"rows of {columns}"
        raise DataError(f"sbibm file {path} holds {values.shape[0]} rows of {values.shape[1]} numbers; expected {want}")
    if not np.isfinite(values).all():
        raise DataError(f"sbibm file {path} holds NaN/inf values; it is corrupt. {HOW_TO_GET}")
    return torch.from_numpy(values).float()


def read_reference(task: Task, folder: Path, num_observations: int = NUM_OBSERVATIONS) -> PosteriorReference:
    """The first ``num_observations`` standard observations of ``task`` from its sbibm ``files`` folder."""
    obs, truth, samples = [], [], []
    for k in range(1, num_observations + 1):
        where = folder / f"num_observation_{k}"
        obs.append(read_csv(where / "observation.csv", "data", task.dim_x, rows=1)[0])
        truth.append(read_csv(where / "true_parameters.csv", "parameter", task.dim_theta, rows=1)[0])
        samples.append(read_csv(where / "reference_posterior_samples.csv.bz2", "parameter", task.dim_theta))
    return PosteriorReference(torch.stack(obs), torch.stack(truth), samples, str(folder))


def analytic_reference(
    task: Task, num_observations: int = NUM_OBSERVATIONS, num_samples: int = NUM_REFERENCE_SAMPLES, seed: int = 0
) -> PosteriorReference:
    """Observations ``x_o ~ p(x | theta_o)``, ``theta_o ~ p(theta)`` (observation ``k`` from the seed
    ``1000000 * (seed + 1) + k``) and exact posterior samples, for tasks with a closed-form posterior."""
    obs, truth, samples = [], [], []
    for k in range(1, num_observations + 1):
        g = torch.Generator().manual_seed(1_000_000 * (seed + 1) + k)
        theta = task.sample_prior(1, g)
        x = task.simulate(theta, g)
        obs.append(x[0])
        truth.append(theta[0])
        samples.append(task.posterior_sample(x[0], num_samples, g))
    return PosteriorReference(torch.stack(obs), torch.stack(truth), samples, "closed form")


def load_reference(
    task: Task, data_dir: str | Path | None, num_observations: int = NUM_OBSERVATIONS, seed: int = 0
) -> PosteriorReference:
    """sbibm's files when they are there (:func:`task_files`), else the closed form of an analytic task, else a
    :class:`DataError` saying where to get the files."""
    if not 1 <= num_observations <= NUM_OBSERVATIONS:
        raise DataError(f"sbibm has {NUM_OBSERVATIONS} standard observations; asked for {num_observations}")
    folder = task_files(task.name, data_dir)
    if folder is not None:
        return read_reference(task, folder, num_observations)
    if task.analytic:
        return analytic_reference(task, num_observations, seed=seed)
    looked = ", ".join(str(r / "sbibm" / "tasks" / task.name / "files") for r in sbibm_roots(data_dir)) or "nowhere"
    raise DataError(
        f"task {task.name} has no closed-form posterior, and its reference posterior files were not found "
        f"(looked in {looked}). {HOW_TO_GET}"
    )
