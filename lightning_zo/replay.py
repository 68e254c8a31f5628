"""Rebuild a run's weights from its base model and trajectory log (docs/DESIGN.md I4).

    python -m lightning_zo.replay RUN_DIR [--to-step T] [--out DIR] [--model MODULE:FACTORY]

The step rules come from the log's header. The base model, in this order: `--model MODULE:FACTORY` (a function
that builds it, for models only code can build), the model config the log's header recorded (runs of the
`lightning-zo` command), the run's Hydra config (RUN_DIR/.hydra/config.yaml, for logs of earlier versions), or the
header's hub id / directory and class (runs made from Python with a Hugging Face model). The last line printed is JSON with `weights_sha256`, equal to the run's summary when replayed
in full.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .cli import user_errors
from .core.aggregation import Aggregation
from .core.rules import UpdateRule
from .core.codecs import codec_from_config
from .core.errors import UserError
from .core.layout import weights_digest
from .core.optimizer import ZOOptimizer
from .core.trajectory import read


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"--model {spec!r}: expected MODULE:FACTORY, e.g. my_package.models:build")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--model {spec!r}: {e}") from e


def load_base(run_dir: Path, header: dict, factory: str | None = None):
    """(model, tokenizer or None): the base model the log was written for (see the module docstring)."""
    from omegaconf import OmegaConf

    from .cli import build_model

    if factory is not None:
        built = _factory(factory)()
        return (built.model, built.tokenizer) if hasattr(built, "tokenizer") else (built, None)
    hydra_config = run_dir / ".hydra" / "config.yaml"
    model_info = header.get("model") or {}
    config = model_info.get("config")  # what the run itself recorded: a later refused start cannot change it
    if config is None and hydra_config.is_file():  # logs written before the header recorded the model
        config = OmegaConf.create(hydra_config.read_text().replace("lightning_zo.models.",
                                                                   "lightning_zo.recipe.models."))
    if config is not None:
        lm = build_model(OmegaConf.create(config))
        return lm.model, lm.tokenizer
    if model_info.get("name_or_path") and not model_info.get("adapter"):
        module, _, name = model_info["class"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls.from_pretrained(model_info["name_or_path"], dtype=getattr(torch, model_info["dtype"])), None
    raise UserError(f"{run_dir}: the log does not say how to build its base model ({header.get('base_model')}); "
                    "pass --model MODULE:FACTORY, a function that returns it")


def rule_keywords(header: dict) -> dict:
    """The update rule's keywords for ZOOptimizer from a header (logs written before rules existed: sgd)."""
    rule = UpdateRule.from_config(header.get("rule"))
    return {"rule": rule.name, "beta": rule.beta, "history": rule.history, "beta2": rule.beta2}


def mask_keywords(header: dict) -> dict:
    """Sparse masks' keywords from a header (logs without `mask`: dense)."""
    mask = header.get("mask")
    return {} if mask is None else {"mask_keep": mask["keep"], "mask_every": mask["every"]}


def optimizer_for(model: torch.nn.Module, header: dict) -> ZOOptimizer:
    """A ZOOptimizer with the logged step rules (lr comes from each record; logs without `aggregation`, `estimator`
    or `population`: the mean, two-sided, none)."""
    aggregation = Aggregation.from_config(header.get("aggregation"))
    opt = ZOOptimizer(model, lr=0.0, eps=header["eps"], weight_decay=header["weight_decay"],
                      distribution=header["distribution"], norm=header["norm"], seed=header["seed"],
                      codec=codec_from_config(header["codec"]), aggregation=aggregation.name, trim=aggregation.trim,
                      estimator=header.get("estimator", "two_sided"), population=header.get("population", "none"),
                      **mask_keywords(header), **rule_keywords(header))
    opt.follow_log(header)
    return opt


def replay(run_dir: Path, to_step: int | None = None, model: torch.nn.Module | None = None,
           progress: bool = True, factory: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Apply the log's records (all, or steps 0..to_step-1) to `model` (default: the run's base model)."""
    if to_step is not None and to_step < 0:
        raise UserError(f"--to-step must be >= 0, got {to_step}")
    log = read(run_dir / "trajectory.zot")
    header = log.header
    tokenizer = None
    if model is None:
        model, tokenizer = load_base(run_dir, header, factory)
    model.to(getattr(torch, header.get("param_dtype", "float32")))  # as the trainer's precision plugin did
    base = weights_digest(model)
    if base != header["base_weights_sha256"]:
        raise UserError(f"the base model's weights ({base[:16]}…) do not match the log's "
                        f"({header['base_weights_sha256'][:16]}…, {header.get('base_model')}): refusing to replay")
    opt = optimizer_for(model, header)
    records = log.records if to_step is None else log.records[:to_step]
    if to_step is not None and to_step > len(log.records):
        raise UserError(f"--to-step {to_step}: the log holds {len(log.records)} steps")
    for record in tqdm(records, desc="replay", unit="step", disable=not progress, file=sys.stderr):
        opt.apply(record)
    opt.close()
    info = {"steps": len(records), "world_sizes": sorted({r.world_size for r in records}),
            "forwards": opt.forwards, "log_bytes": (run_dir / "trajectory.zot").stat().st_size,
            "weights_sha256": weights_digest(model)}
    return model, info | ({"tokenizer": tokenizer} if tokenizer is not None else {})


def export(model: torch.nn.Module, out: Path, tokenizer=None) -> None:
    """A directory `from_pretrained` loads; a peft model is merged, its adapter kept in OUT/adapter."""
    if not hasattr(model, "save_pretrained"):
        raise UserError("--out needs a Hugging Face model (save_pretrained); this base model has none")
    if getattr(model, "peft_config", None):
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_zo.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with trajectory.zot")
    parser.add_argument("--to-step", type=int, default=None, help="replay steps 0..T-1 only")
    parser.add_argument("--out", type=Path, default=None, help="write a Hugging Face model directory here (with a "
                        "peft adapter: the merged model, and the adapter in OUT/adapter)")
    parser.add_argument("--model", dest="factory", default=None, metavar="MODULE:FACTORY",
                        help="build the base model by calling this function (for models only code can build)")
    args = parser.parse_args(argv)
    with user_errors():
        model, info = replay(args.run_dir, args.to_step, factory=args.factory)
    tokenizer = info.pop("tokenizer", None)
    if args.out is not None:
        export(model, args.out, tokenizer)
        info["out"] = str(args.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
