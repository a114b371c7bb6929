"""Is the Hugging Face hub reachable? Asked once per process, answered within seconds.

`engines/model.py` and `workflows/data/dataset.py` ask before they touch the hub, so that a
machine without network falls back to an offline copy (the packaged model, the shipped
GSM8K, the local HF cache) at once instead of after the libraries' own retries, and a hub
id with no offline copy fails with one line (`HubUnreachableError`) instead of a
traceback. A hub that answers but has no such repository (or refuses access to it) is a
`HubError` with one line too; `areal train` prints either and exits with status 2.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

# Any of these set to a true value (as huggingface_hub and datasets read them) means offline.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class HubError(OSError):
    """A hub id in the config cannot be used. The message is one line naming the config
    key, the id and the fix."""


class HubUnreachableError(HubError):
    """A hub id was asked for, the hub cannot be reached and no offline copy is known."""


def unreachable_error(key: str, value: str, fix: str) -> HubUnreachableError:
    """The one-line error for config key `key` holding hub id `value`, with the reason the
    hub is unreachable and `fix` (e.g. `<local model dir>`) as what to pass instead."""
    return HubUnreachableError(
        f"{key}={value!r}: the Hugging Face hub is unreachable ({unreachable_reason()}) and no offline copy "
        f"is known; pass {key}={fix}"
    )


def refused_error(key: str, value: str, fix: str, exc: BaseException) -> HubError:
    """The one-line error for hub id `value` of `key` that the (reachable) hub does not
    serve: no such repository, or a gated/private one without access."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    reason = " ".join(lines[:2])[:200] or type(exc).__name__  # e.g. "404 Client Error. Repository Not Found for url: ..."
    return HubError(
        f"{key}={value!r}: the Hugging Face hub has no such repository or refuses access ({reason}); "
        f"pass an existing hub id or {key}={fix}"
    )


def _offline_env() -> Optional[str]:
    """`NAME=value` of the first offline variable set to a true value, else None."""
    for name in OFFLINE_ENV:
        value = os.environ.get(name, "").strip()
        if value.upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{name}={value}"
    return None


def offline_by_env() -> bool:
    """True when the environment asks the Hugging Face libraries to stay offline."""
    return _offline_env() is not None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a HEAD request on its endpoint within `timeout` seconds.

    False at once when `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` is
    set. Otherwise the request goes through `huggingface_hub.get_session()`, so proxies
    and `HF_ENDPOINT` are honoured as for a download; an answer below 400 counts as
    reachable (a proxy that refuses, or a server that is not the hub, does not). The
    answer is cached for the rest of the process.
    """
    if offline_by_env():
        return False
    return _probe(float(timeout)) is None


def unreachable_reason(timeout: float = 3.0) -> str:
    """Why `hub_reachable()` says no, in a few words (the variable set, or the error)."""
    return _offline_env() or _probe(float(timeout)) or "it answered"


@functools.lru_cache(maxsize=None)
def _probe(timeout: float) -> Optional[str]:
    """None when the hub answers, else the reason on one short line."""
    from huggingface_hub import constants, get_session

    try:
        status = get_session().head(constants.ENDPOINT, timeout=timeout).status_code
    except Exception as exc:  # DNS failure, refused connection, timeout, proxy error...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    else:
        if status < 400:
            return None
        reason = f"HTTP {status}"
    logger.debug("Hugging Face hub at %s unreachable: %s", constants.ENDPOINT, reason)
    return f"{constants.ENDPOINT}: {reason[:160]}"


hub_reachable.cache_clear = _probe.cache_clear  # for tests
