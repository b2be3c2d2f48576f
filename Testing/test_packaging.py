"""The pip package as users install it: the wheel, not the checkout the other tests import.

Every other test imports PAMSegmentLib from the source tree, which finds the weights and demo data
in ``Resources/`` beside it; a wheel that left them out (a typo in pyproject.toml's package-dir or
package-data, a renamed file) would pass those tests and fail every user's ``pamsegment demo``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the files the package is built from (so that the build
    leaves nothing in the checkout), the way ``pip install .`` builds it (build isolation)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "PAMSegmentLib", src / "PAMSegmentLib",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for sub in ("Models", "Demo"):
        shutil.copytree(ROOT / "Resources" / sub, src / "Resources" / sub)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and _setuptools_new_enough():  # no index here (offline): build with the one installed
        proc = subprocess.run(command + ["--no-build-isolation"], capture_output=True, text=True, timeout=600)
    elif proc.returncode != 0 and "setuptools" in proc.stderr and any(
            word in proc.stderr for word in ("Could not find a version", "No matching distribution", "connection")):
        pytest.skip("pip cannot fetch the build backend (setuptools>=77) from an index here, and the one installed "
                    "is older; CI reaches PyPI")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def _setuptools_new_enough() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def test_the_wheel_holds_the_modules_the_weights_their_card_and_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for resource in ("PAMSegmentLib/models/pam_small.pt", "PAMSegmentLib/models/pam_small.json",
                     "PAMSegmentLib/demo_data/abdomen_ct.nii.gz", "PAMSegmentLib/demo_data/abdomen_prompt.nii.gz",
                     "PAMSegmentLib/demo_data/abdomen_reference.nii.gz"):
        assert resource in names, f"{resource} is missing from {wheel.name}"
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "PAMSegmentLib").rglob("*.py")}
    assert modules - names == set()
    weights = zipfile.ZipFile(wheel).read("PAMSegmentLib/models/pam_small.pt")
    assert weights == (ROOT / "Resources" / "Models" / "pam_small.pt").read_bytes()


def test_the_installed_wheel_finds_its_weights_and_demo_data_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("PAMSEGMENT_MODEL", None)
    code = ("import PAMSegmentLib; from PAMSegmentLib.checkpoints import shipped_checkpoint_path; "
            "from PAMSegmentLib.demo import demo_data_dir; "
            "print(PAMSegmentLib.__file__); print(shipped_checkpoint_path()); print(demo_data_dir())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, weights, demo = (Path(line) for line in proc.stdout.split())
    for path in (module, weights, demo):  # the installed copy, not the checkout
        assert path.resolve().is_relative_to(site.resolve()), path
    # and the command line loads the shipped weights from there (checked against their model card)
    proc = subprocess.run([sys.executable, "-m", "PAMSegmentLib", "info"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loads: yes" in proc.stdout and str(site) in proc.stdout
