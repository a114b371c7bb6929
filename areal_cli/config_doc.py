"""`areal config show --doc`: every leaf key of a resolved config with its value, help text
and choices, all read from the schema's field metadata (`engines.config.option`)."""

from __future__ import annotations

import json
import typing
from typing import Any

from areal_cli.rules import lookup
from engines.config import leaf_fields
from workflows.config import ExperimentConfig


def render_value(value: Any) -> str:
    """`value` as an override would spell it (null, true, [1,4,8])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quoted where the bare text would not read back as one line (a multi-line instruction).
        return value if value.strip() and "\n" not in value else json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def doc_lines(cfg: ExperimentConfig) -> list[str]:
    """Two lines per leaf key, in the schema's order:

        key=value
            help text [one of: a, b, c]
    """
    lines = []
    for key, f, hint in leaf_fields(ExperimentConfig):
        text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            kind = "each of" if typing.get_origin(hint) is list else "one of"
            null = ", or null" if type(None) in typing.get_args(hint) else ""
            text += f" [{kind}: {', '.join(f.metadata['choices'])}{null}]"
        lines += [f"{key}={render_value(lookup(cfg, key))}", f"    {text}"]
    return lines
