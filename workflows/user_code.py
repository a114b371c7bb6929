"""The user's own code named in a config: `package.module:name` or `path/to/file.py:name`.

`reward.fn` and `rollout.workflow` name functions and classes this way. Everything that
can be checked without running them (the module imports, the name exists, the signature
takes the documented arguments) is checked here, at config time and again in every
process that builds them, and refused with a `UserCodeError` whose message is one line
naming the key, the value and, for a file, the line at fault.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

# The keyword arguments a reward function may take besides (completion, reference).
REWARD_KEYWORDS = ("prompt", "row")
# What the run passes to a rollout workflow's constructor, where the constructor takes it.
WORKFLOW_KEYWORDS = ("gconfig", "tokenizer", "scorer", "seed")
_FILE_MODULES = "areal_user_code"


class UserCodeError(ValueError):
    """A config key names code that cannot be loaded or used; the message is one line."""


def is_import_path(value: str) -> bool:
    """Whether `value` has the form `module:name` or `file.py:name` (not a built-in name)."""
    target, sep, attr = value.rpartition(":")
    return bool(sep and target and attr)


def load_object(spec: str, key: str) -> Any:
    """The object `spec` names: `package.module:name` (imported with importlib) or
    `path/to/file.py:name` (`~` expanded, relative to the working directory). A file is
    loaded once per process, as module `areal_user_code.<stem>_<hash of its path>`.

    Raises:
        UserCodeError: malformed spec, no such file or module, the module raised while
            importing (its exception and the file's line), or it has no such name.
    """
    target, sep, attr = spec.rpartition(":")
    if not (sep and target and attr):
        raise UserCodeError(f"{key}={spec!r} must be package.module:name or path/to/file.py:name")
    try:
        module = _load_file(target, spec, key) if target.endswith(".py") else importlib.import_module(target)
    except UserCodeError:
        raise
    except ModuleNotFoundError as exc:
        raise UserCodeError(f"{key}={spec!r}: cannot import {target!r} ({exc}); check the module path, or pass "
                            "path/to/file.py:name") from None
    except BaseException as exc:  # noqa: BLE001 - anything the user's module raises while importing
        raise UserCodeError(f"{key}={spec!r}: importing {target} raised {_describe(exc)}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in vars(module) if not n.startswith("_"))[:10]
            raise UserCodeError(f"{key}={spec!r}: {target} has no {attr!r} (it defines: {', '.join(names) or 'nothing'})")
        obj = getattr(obj, part)
    return obj


def _load_file(target: str, spec: str, key: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UserCodeError(f"{key}={spec!r}: no such file {path}")
    name = f"{_FILE_MODULES}.{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, so that classes and functions it defines pickle by
    # reference within this process (dataclasses and typing look the module up, too).
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _describe(exc: BaseException) -> str:
    """`Type: first line of the message (file, line N)` for an exception from user code."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        return f"{text} ({frames[-1].filename}, line {frames[-1].lineno})"
    return text


def reward_keywords(fn: Any, spec: str, key: str = "reward.fn") -> frozenset[str]:
    """The keyword arguments of `REWARD_KEYWORDS` that `fn` takes (all of them with
    `**kwargs`), after checking that `fn(completion, reference, **those)` binds.

    Raises:
        UserCodeError: `fn` is not callable, or its signature does not take two
            positional arguments plus only those keywords.
    """
    signature = _signature(fn, spec, key)
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    accepted = frozenset(k for k in REWARD_KEYWORDS if takes_any or k in named)
    try:
        signature.bind("completion", "reference", **{k: None for k in accepted})
    except TypeError as exc:
        raise UserCodeError(
            f"{key}={spec!r}: {_name(fn)}{signature} cannot be called as fn(completion, reference"
            + "".join(f", {k}=..." for k in accepted) + f") ({exc}); a reward function takes (completion: str, "
            "reference: str) and optionally the keywords prompt and row (workflows/api.py, RewardFn)"
        ) from None
    return accepted


def workflow_keywords(factory: Any, args: dict, spec: str, key: str = "rollout.workflow") -> frozenset[str]:
    """The keywords of `WORKFLOW_KEYWORDS` the workflow constructor `factory` takes, after
    checking that `factory(**args, **those)` binds and, for a class, that it has an
    async `arun_episode`.

    Raises:
        UserCodeError: not callable, no async `arun_episode`, or the arguments do not bind.
    """
    signature = _signature(factory, spec, key)
    if inspect.isclass(factory) and not inspect.iscoroutinefunction(getattr(factory, "arun_episode", None)):
        raise UserCodeError(f"{key}={spec!r}: {factory.__name__} has no `async def arun_episode(self, engine, data)`; "
                            "a rollout workflow implements workflows/api.py's RolloutWorkflow")
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = frozenset(k for k in WORKFLOW_KEYWORDS if (takes_any or k in params) and k not in args)
    try:
        signature.bind(**dict(args), **{k: None for k in accepted})
    except TypeError as exc:
        raise UserCodeError(f"{key}={spec!r} with rollout.workflow_args={dict(args)}: {_name(factory)}{signature} "
                            f"does not take them ({exc})") from None
    return accepted


def _signature(obj: Any, spec: str, key: str) -> inspect.Signature:
    if not callable(obj):
        raise UserCodeError(f"{key}={spec!r} names a {type(obj).__name__}, not a function or class")
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        raise UserCodeError(f"{key}={spec!r}: cannot read its signature ({exc})") from None


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def first_line(exc: BaseException, limit: Optional[int] = 300) -> str:
    """`Type: message`, the message's first line only, at most `limit` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:limit] if limit else text
