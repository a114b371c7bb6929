"""`config=NAME` plus Hydra overrides -> a typed `ExperimentConfig`.

The YAML files in `areal_cli/configs/` are merged onto the schema, the dataclasses of
`workflows/config.py` (Hydra structured configs), so an unknown key or a value of the wrong type is refused before anything
runs. `load_config` turns those refusals into a `ConfigError` that names the key and, for
a typo, the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from areal_cli.validation import ConfigError, check_config
from workflows.config import ExperimentConfig

SCHEMA_NAME = "areal_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


def config_dir() -> Path:
    """The Hydra config tree: $AREAL_CONFIG_DIR, else `configs/` beside this module (package
    data, so it is there in a non-editable install too)."""
    return Path(os.environ.get("AREAL_CONFIG_DIR", Path(__file__).resolve().parent / "configs"))


def split_cli_args(args: list[str]) -> tuple[str, list[str]]:
    """Separate `config=NAME` from the Hydra overrides; raises ConfigError without it."""
    name, overrides = None, []
    for arg in args:
        if arg.startswith("config="):
            name = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if not name:
        available = ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml")))
        raise ConfigError(f"missing config=NAME (available: {available})")
    return name, overrides


def load_config(
    name: str, overrides: list[str] = (), *, world_size: Optional[int] = None, check_paths: bool = True
) -> ExperimentConfig:
    """Compose a config with `overrides` into a typed, checked ExperimentConfig.

    `name` is a shipped config (`gsm8k_grpo` -> `<config_dir()>/gsm8k_grpo.yaml`) or the
    path of the user's own YAML file (`path/to/my_exp.yaml`), which is merged onto the
    same schema and may list shipped configs and groups in its `defaults`. Every value
    is then checked (`areal_cli/validation.py`; `world_size` and `check_paths` go there).

    Raises:
        ConfigError: unknown config name or file, malformed override, unknown key (with
            a suggestion), bad type, or a value out of range; the message is one line.
    """
    overrides = list(overrides)
    for word in overrides:
        _check_override_grammar(word)
    directory, primary, extra = _primary_config(name)
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = compose(config_name=primary, overrides=extra + overrides)
        # `+key=value` adds keys that the schema lacks, and to_object would drop them
        # silently; refuse them like any other unknown key.
        _check_known_keys(cfg, ExperimentConfig, prefix="")
        resolved = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (ConfigCompositionException, OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
        # Hydra raises plain ValueError/KeyError for some well-formed but meaningless
        # overrides (`=3`); every one is a mistake in the words the user typed.
        raise ConfigError(_explain(exc)) from None
    check_config(resolved, world_size=world_size, check_paths=check_paths)
    return resolved


USER_PRIMARY = "areal_user_config"


def _primary_config(name: str) -> tuple[Path, str, list[str]]:
    """(directory to compose in, primary config name, extra overrides) for `config=name`."""
    directory = config_dir()
    if not name.endswith((".yaml", ".yml")):
        if not (directory / f"{name}.yaml").exists():
            available = sorted(p.stem for p in directory.glob("*.yaml"))
            hint = difflib.get_close_matches(name, available, n=1)
            raise ConfigError(
                f"config={name} names no shipped config"
                + (f"; did you mean config={hint[0]}?" if hint else "")
                + f" (available: {', '.join(available)}, or a path ending in .yaml)"
            )
        return directory, name, []
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config={name}: no such file; pass an existing YAML file or a shipped config name")
    _check_yaml_file(path, name)
    # A user's file is composed as `[schema, file, _self_]`, so it needs no defaults list
    # of its own; the shipped tree stays on the search path for the ones it has.
    ConfigStore.instance().store(name=USER_PRIMARY, node={"defaults": [SCHEMA_NAME, path.stem, "_self_"]})
    return path.parent, USER_PRIMARY, [f"hydra.searchpath=[file://{directory}]"]


def _check_yaml_file(path: Path, name: str) -> None:
    """Refuse a user's YAML file that does not parse, naming its line and column, or whose
    top level is not a mapping of keys."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config={name}: not valid YAML at {where} ({problem}); fix the file") from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as exc:
        raise ConfigError(f"config={name}: cannot read it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config={name}: the file holds a list, not a mapping of config keys (key: value lines)")


_OVERRIDE_PARSER = OverridesParser.create()


def _check_override_grammar(word: str) -> None:
    try:
        parsed = _OVERRIDE_PARSER.parse_override(word)
    except HydraException as exc:
        reason = str(exc).strip().splitlines()
        detail = reason[1].strip() if len(reason) > 1 else (reason[0] if reason else "")
        detail = detail.split(" expecting ", 1)[0]  # ANTLR's list of every token it would take
        hint = "; quote a value that starts with ~ (key='~/path')" if "=~" in word else ""
        raise ConfigError(
            f"cannot read the override {word!r} ({detail}); write key=value, +key=value or ~key{hint}"
        ) from None
    if not parsed.key_or_group:
        raise ConfigError(f"the override {word!r} names no key; write key=value, +key=value or ~key")


# ---------------------------------------------------------------------------------------
# Turning Hydra / OmegaConf errors into messages that say what to change.


def _explain(exc: Exception) -> str:
    # Hydra wraps the OmegaConf error that names the key; unwrap to the root cause.
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = str(root).strip()
    full_key = getattr(root, "full_key", None) or _key_from_text(text) or _key_from_text(str(exc))
    first_line = text.splitlines()[0] if text else type(root).__name__
    if isinstance(root, MissingConfigException) or isinstance(exc, MissingConfigException):
        return _missing_option_message(text)
    if full_key and "not in" in text:
        return _unknown_key_message(full_key)
    if full_key and "does not support deletion" in text:
        return f"'~{full_key}': keys of the schema cannot be deleted; set {full_key}=null to clear an optional one"
    if full_key:
        return f"{full_key}: {first_line}; pass a value of the key's type (areal config show lists them)"
    return first_line


def _missing_option_message(text: str) -> str:
    match = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if not match:
        return text.splitlines()[0]
    group, option = match.groups()
    available = sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
    return f"{group}={option} names no {group} config; use one of {', '.join(available) or '(none)'}"


def _check_known_keys(node: Any, schema: type, prefix: str) -> None:
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        full_key = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(_unknown_key_message(full_key))
        default = known[key].default_factory() if callable(known[key].default_factory) else None
        if is_dataclass(default):
            _check_known_keys(node[key], type(default), prefix=full_key + ".")


# Keys that were renamed: the old key -> what to write instead.
MOVED_KEYS = {
    "rollout.reward_format": "reward.fn (any: math_verify, boxed: boxed_math_verify, number: final_number)",
}


def _unknown_key_message(full_key: str) -> str:
    if full_key in MOVED_KEYS:
        return f"config key {full_key!r} is now {MOVED_KEYS[full_key]}"
    parent, _, leaf = full_key.rpartition(".")
    valid = _keys_at(parent)
    hint = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    msg = f"unknown config key {full_key!r}"
    if hint:
        return msg + f"; did you mean {hint[0]!r}?"
    if valid:
        return msg + f"; valid keys under {parent or 'the top level'}: {', '.join(valid)}"
    return msg


def _key_from_text(text: str) -> Optional[str]:
    match = re.search(r"full_key:\s*(\S+)", text) or re.search(r"Key '([^']+)'", text)
    return match.group(1) if match else None


def _keys_at(dotted: str) -> list[str]:
    node: Any = ExperimentConfig
    for part in filter(None, dotted.split(".")):
        match = [f for f in fields(node) if f.name == part] if is_dataclass(node) else []
        if not match:
            return []
        node = match[0].default_factory() if callable(match[0].default_factory) else match[0].default
        node = type(node) if is_dataclass(node) else node
    return [f.name for f in fields(node)] if is_dataclass(node) else []
