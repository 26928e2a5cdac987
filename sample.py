"""Samples from a checkpoint: ``python sample.py ckpt_path=... num_samples=64 temperature=0.7``."""

import hydra
from omegaconf import DictConfig

from flowforge import experiment


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    experiment.main(experiment.sample, cfg)


if __name__ == "__main__":
    main()
