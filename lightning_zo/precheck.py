"""The command line's overrides checked before Hydra runs and anything loads: an unknown group option or key, a
value of the wrong type, `--key value` are one `error:` line (UserError), not Hydra's multi-line report or a
TypeError deep in a run."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .core.errors import UserError


def config_dir() -> Path:
    """The Hydra configs: lightning_zo/conf inside an installed wheel (pyproject.toml maps conf/ there), conf/ at the
    top level of a checkout (or an editable install of one)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


# Hydra's own flags: a pre-check of the overrides would be in their way (they print, or use another config).
_NO_PRECHECK = {"--help", "-h", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc",
                "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}


def _overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) from Hydra's command line, or None when a flag means we must not interfere."""
    overrides, multirun, skip = [], False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in _NO_PRECHECK:
            return None
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in ("--resolve", "-r", "--run"):
            continue
        elif flag in _FLAGS_WITH_VALUE:
            skip = "=" not in arg
        elif arg.startswith("--") and len(arg) > 2:
            raise UserError(_key_value_hint(argv, i))
        elif arg.startswith("-"):
            return None  # a flag we do not know: let Hydra handle (and explain) it
        else:
            overrides.append(arg)
    return overrides, multirun


def _key_value_hint(argv: list[str], i: int) -> str:
    """`--model tiny` (or `--model=tiny`), an option as other tools spell it: Hydra's overrides are `model=tiny`."""
    key, _, value = argv[i][2:].partition("=")
    following = argv[i + 1] if i + 1 < len(argv) else ""
    if not value and following and not following.startswith("-") and "=" not in following:
        value = following
    given = " ".join(argv[i:i + 2]) if value and value == following else argv[i]
    return f"{given}: not an option of this command; settings are written key=value: {key}={value or 'VALUE'}"


def _sweep_jobs(overrides: list[str], limit: int = 64) -> list[list[str]]:
    """Override lists to pre-check for a multirun: every sweep at its first value, then each sweep value in turn
    with the others at their first (`a=1,2 b=x,y` -> [a=1 b=x], [a=2 b=x], [a=1 b=y]); Hydra runs the product."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [list(o.sweep_string_iterator()) if o.is_sweep_override() else [text]
              for text, o in zip(overrides, parsed)]
    keyed = [[v if not o.is_sweep_override() else f"{o.get_key_element()}={v}" for v in vals] or [text]
             for text, o, vals in zip(overrides, parsed, values)]
    first = [vals[0] for vals in keyed]
    jobs = [first]
    for i, vals in enumerate(keyed):
        jobs += [first[:i] + [v] + first[i + 1:] for v in vals[1:]]
    return jobs[:limit]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _unknown_key_message(key: str, override: str, overrides: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    hint = ""
    try:
        cfg = compose_config([o for o in overrides if o != override])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig):
            keys = [str(k) for k in node.keys() if parent or k != "hydra"]
            close = difflib.get_close_matches(leaf, keys, n=1)
            hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else \
                f"; {parent or 'the config'} has: {', '.join(keys)}"
    except Exception:  # the hint is a courtesy; the message stands without it
        pass
    return f"unknown key {key!r}{hint} (to add a new key on purpose: +{override.lstrip('+~')})"


# Numeric keys of Lightning's Trainer that take more than their default's type: devices="auto" or "0,1"; a fraction
# of an epoch (a float) where the default counts batches or steps.
_WORDS_ALLOWED = {"trainer.devices"}
_FRACTIONS_ALLOWED = {"trainer.val_check_interval", "trainer.limit_train_batches", "trainer.limit_val_batches",
                      "trainer.limit_test_batches", "trainer.overfit_batches"}


def _check_types(overrides: list[str], cfg: DictConfig) -> None:
    """A value of the wrong type for its key's default (trainer.max_steps=ten, optimizer.lr=fast, a word for a flag)
    is one line here, during composition: the config has no schema, and it ended in a TypeError deep in a run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import Container

    parsed = OverridesParser.create().parse_overrides(overrides)
    values = {o.key_or_group: (text, o.value()) for text, o in zip(overrides, parsed)
              if o.type == OverrideType.CHANGE and "/" not in o.key_or_group and o.package is None
              and o.value() is not None and not (isinstance(o.value(), str) and "${" in o.value())}
    groups = OmegaConf.select(cfg, "hydra.runtime.choices") or {}  # model=tiny, experiment=quick: choices, not values
    leaves = {key for key in values if key not in groups
              and not isinstance(OmegaConf.select(cfg, key, throw_on_resolution_failure=False), Container)}
    if not leaves:
        return
    defaults = compose_config([text for text, o in zip(overrides, parsed) if o.key_or_group not in leaves])
    for key in sorted(leaves):
        text, value = values[key]
        default = OmegaConf.select(defaults, key, throw_on_resolution_failure=False)
        if isinstance(default, bool):
            ok, expected = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok = (isinstance(value, int) and not isinstance(value, bool)
                  or key in _FRACTIONS_ALLOWED and isinstance(value, float)
                  or key in _WORDS_ALLOWED and isinstance(value, str))
            expected = "an integer"
        elif isinstance(default, float):
            ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        if not ok:
            shown = str(default).lower() if isinstance(default, bool) else default
            raise UserError(f"{text}: expected {expected} (the config's default is {shown})")


def precheck(argv: list[str]) -> None:
    """Compose the config from the command line's overrides before Hydra runs, so that an unknown group option
    or key is one `error:` line (UserError) instead of Hydra's multi-line report and exit code 1."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    parsed = _overrides(argv)
    if parsed is None:
        return
    overrides, multirun = parsed
    try:
        for overrides in _sweep_jobs(overrides) if multirun else [overrides]:
            _check_types(overrides, compose_config(overrides))
    except MissingConfigException as e:
        group, _, option = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            raise UserError(f"unknown {group} {option!r}; choose one of {', '.join(e.options)}") from None
        raise UserError(str(e).strip().splitlines()[0]) from None
    except ConfigCompositionException as e:
        text = str(e)
        match = re.match(r"Could not override '([^']+)'", text)
        if match:
            key = match.group(1)
            override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
            raise UserError(_unknown_key_message(key, override, overrides)) from None
        if text.startswith("Ambiguous value"):
            raise UserError(text.splitlines()[0] + ": quote it ('a,b'), make it a list ([a,b]) or sweep with -m") \
                from None
        raise UserError(text.strip().splitlines()[0]) from None
    except HydraException as e:
        raise UserError(f"bad override: {str(e).strip().splitlines()[0]}") from None
