"""Rebuild a run's weights from its base model and trajectory log (DESIGN I4).

    python -m lightning_zo.replay RUN_DIR [--to-step T] [--out DIR]

The base model comes from the run's Hydra config (RUN_DIR/.hydra/config.yaml); the step rules from the log's
header. The last line printed is JSON with `weights_sha256`, equal to the run's summary when replayed in full.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .core.codecs import codec_from_config
from .cli import user_errors
from .core.errors import UserError
from .core.optimizer import ZOOptimizer
from .core.layout import weights_digest
from .core.trajectory import read


def load_base(run_dir: Path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config} not found: RUN_DIR must be a lightning_zo run directory")
    return instantiate(OmegaConf.load(config).model)


def replay(run_dir: Path, to_step: int | None = None, model: torch.nn.Module | None = None,
           progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Apply the log's records (all, or steps 0..to_step-1) to `model` (default: the run's base model)."""
    log = read(run_dir / "trajectory.zot")
    lm = None
    if model is None:
        lm = load_base(run_dir)
        model = lm.model
    header = log.header
    model.to(getattr(torch, header.get("param_dtype", "float32")))  # as the trainer's precision plugin did
    base = weights_digest(model)
    if base != header["base_weights_sha256"]:
        raise UserError(f"the base model's weights ({base[:16]}…) do not match the log's "
                        f"({header['base_weights_sha256'][:16]}…, {header.get('base_model')}): refusing to replay")
    opt = ZOOptimizer(model, lr=0.0, eps=header["eps"], weight_decay=header["weight_decay"],
                      distribution=header["distribution"], norm=header["norm"], seed=header["seed"],
                      codec=codec_from_config(header["codec"]))
    records = log.records if to_step is None else log.records[:to_step]
    if to_step is not None and to_step > len(log.records):
        raise UserError(f"--to-step {to_step}: the log holds {len(log.records)} steps")
    for record in tqdm(records, desc="replay", unit="step", disable=not progress, file=sys.stderr):
        opt.apply(record)
    opt.forward_hooks.remove()
    info = {"steps": len(records), "world_sizes": sorted({r.world_size for r in records}),
            "log_bytes": (run_dir / "trajectory.zot").stat().st_size, "weights_sha256": weights_digest(model)}
    return model, info | ({"tokenizer": lm.tokenizer} if lm else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zo.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with trajectory.zot and .hydra/config.yaml")
    parser.add_argument("--to-step", type=int, default=None, help="replay steps 0..T-1 only")
    parser.add_argument("--out", type=Path, default=None, help="write a Hugging Face model directory here")
    args = parser.parse_args(argv)
    with user_errors():
        model, info = replay(args.run_dir, args.to_step)
    tokenizer = info.pop("tokenizer", None)
    if args.out is not None:
        model.save_pretrained(args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        info["out"] = str(args.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
