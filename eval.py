"""Test metrics of a checkpoint: ``python eval.py ckpt_path=logs/train/runs/<time>/checkpoints/last.ckpt``."""

import hydra
from omegaconf import DictConfig

from flowforge import experiment


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    experiment.main(experiment.evaluate, cfg)


if __name__ == "__main__":
    main()
