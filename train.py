"""Train a flow: ``python train.py model=glow dataset=digits`` (see README for all choices)."""

import sys

import hydra
from omegaconf import DictConfig

from flowforge import experiment
from flowforge.checks import check_moved_keys
from flowforge.errors import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = experiment.main(experiment.train, cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"), float("nan"))


if __name__ == "__main__":
    try:
        check_moved_keys(sys.argv[1:])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    main()
