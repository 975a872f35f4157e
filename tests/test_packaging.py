"""What a user's install gets: a wheel built from this tree ships the demo config, and an
installed (non-editable) paf_ray finds it and runs `paf-ray demo --help` from another folder.

The wheel is built offline from a copy of the tree (no build isolation, so nothing is
fetched), installed with ``pip --no-deps --target`` beside this environment's dependencies,
and used from a folder that holds no checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("paf_ray", "jobs"):
        shutil.copytree(os.path.join(REPO, name), src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(src)], check=True, timeout=300)
    (wheel,) = dist.glob("paf_ray-*.whl")
    return wheel


def test_wheel_ships_the_demo_config(built_wheel):
    with zipfile.ZipFile(built_wheel) as z:
        names = set(z.namelist())
        assert "paf_ray/configs/demo.yaml" in names
        shipped = z.read("paf_ray/configs/demo.yaml")
    with open(os.path.join(REPO, "jobs", "demo.yaml"), "rb") as f:
        assert shipped == f.read(), "the packaged demo config must be jobs/demo.yaml itself"
    assert not any(n.startswith(("tests/", "jobs/")) for n in names)
    # `paf-ray bench` is a command of the product (docs/benchmarks.md says why it ships)
    assert {"paf_ray/bench/run.py", "paf_ray/bench/step_case.py"} <= names


def test_installed_package_runs_the_demo_command_from_another_folder(built_wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(target), str(built_wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import paf_ray, sys\n"
        "from paf_ray.config import load_config\n"
        "from paf_ray.train.demo import DEFAULT_DEMO_CONFIG\n"
        "cfg = load_config(DEFAULT_DEMO_CONFIG)\n"
        "print(paf_ray.__file__)\n"
        "print(cfg.name, cfg.command, cfg.data.synth.images)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(target)), f"imported {out[0]}, not the installed wheel"
    assert out[1].split()[:2] == ["demo", "demo"]
    help_text = subprocess.run([sys.executable, "-m", "paf_ray", "demo", "--help"], cwd=elsewhere, env=env,
                               check=True, capture_output=True, text=True, timeout=120).stdout
    assert "--out" in help_text and "--config" in help_text
