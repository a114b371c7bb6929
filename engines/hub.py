"""Is the Hugging Face hub reachable? Asked once per process, answered within seconds.

`engines/model.py` and `workflows/dataset.py` ask before they touch the hub, so that a
machine without network falls back to an offline copy (the packaged model, the shipped
GSM8K, the local HF cache) at once instead of after the libraries' own retries, and a hub
id with no offline copy fails with one line (`HubUnreachableError`) instead of a
traceback.
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

# Any of these set to a true value (as huggingface_hub and datasets read them) means offline.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class HubUnreachableError(OSError):
    """A hub id was asked for, the hub cannot be reached and no offline copy is known.

    The message is one line naming the config key, the id and the fix.
    """


def offline_by_env() -> bool:
    """True when the environment asks the Hugging Face libraries to stay offline."""
    return any(os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for name in OFFLINE_ENV)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a HEAD request on its endpoint within `timeout` seconds.

    False at once when `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` is
    set. Otherwise the request goes through `huggingface_hub.get_session()`, so proxies
    and `HF_ENDPOINT` are honoured as for a download; any HTTP answer counts as
    reachable. The answer is cached for the rest of the process.
    """
    if offline_by_env():
        return False
    return _probe(float(timeout))


@functools.lru_cache(maxsize=None)
def _probe(timeout: float) -> bool:
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # DNS failure, refused connection, timeout, proxy error...
        logger.info("Hugging Face hub at %s unreachable: %s", constants.ENDPOINT, exc)
        return False
    return True


hub_reachable.cache_clear = _probe.cache_clear  # for tests
