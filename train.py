"""Train a flow: ``python train.py model=glow dataset=digits`` (see README for all choices)."""

import hydra
from omegaconf import DictConfig

from flowforge import experiment


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    metrics = experiment.main(experiment.train, cfg)
    return metrics.get(cfg.get("optimized_metric", "val/loss"), float("nan"))


if __name__ == "__main__":
    main()
