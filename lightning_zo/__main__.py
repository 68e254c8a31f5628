"""`python -m lightning_zo ...` is `lightning-zo ...` is `python train.py ...`."""

from lightning_zo.cli import main

if __name__ == "__main__":
    main()
