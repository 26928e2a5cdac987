"""Every sweep file in sweeps/ lists only valid choices: each point of its grid composes with the real
config tree (the runs themselves are exercised for the small sweeps in test_experiments_fit.py)."""

import itertools
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def grid(path: Path) -> list[list[str]]:
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(p) for p in itertools.product(*axes)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_point_composes(path):
    points = grid(path)
    assert points
    for overrides in points:
        cfg = compose(overrides)
        for o in overrides:
            key, value = o.split("=", 1)
            if key not in ("experiment", "dataset"):
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node) == value, (path.name, o)
        assert cfg.model._target_ and cfg.dataset._target_
