"""Train with zeroth-order steps: `python train.py` is the offline default; Hydra overrides for the rest.

    python train.py model=tiny trainer.max_steps=20          # seconds, for a smoke test
    python train.py task=sst2 task.data_dir=../shared/data/sst2
    python train.py --help                                   # every config group and option
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_zo.cli import run
from lightning_zo.errors import user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


if __name__ == "__main__":
    sys.exit(main())
