"""Train with zeroth-order steps: `python train.py` is the offline default; Hydra overrides for the rest.

A thin alias of the `lightning-zo` command (and of `python -m lightning_zo`): the configs live in conf/.

    python train.py model=tiny trainer.max_steps=20          # seconds, for a smoke test
    python train.py task=sst2 task.data_dir=PATH/TO/sst2     # a GLUE-style directory with train.tsv
    python train.py --help                                   # every config group and option
"""

import signal

# A SIGTERM during the imports (seconds) waits for the CLI's handler, which stops the run cleanly (cli.main).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

from lightning_zo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
