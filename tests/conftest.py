"""Shared fixtures: one local Ray for the whole session, a small synthetic BDD100K root.

HOME points at a private folder for the session: a Ray that starts here writes its auth
token under ~/.ray, and that must never switch another cluster on this machine to token auth.
"""

from __future__ import annotations

import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="paf_ray_test_home_")
os.environ["HOME"] = _HOME
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

# Real reference data carried by the repository (provenance and licences: tests/data/NOTICE).
TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and the dashboard (Tune's early-stop cleanup needs it)."""
    import ray

    from paf_ray.train.ray_setup import init_ray

    init_ray(address="local", num_cpus=2, object_store_mb=512)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset in the official layout (shared by tests; do not modify)."""
    from paf_ray.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(str(root), images=32, seed=0, size=(320, 180), val_fraction=0.25)
    return str(root)


@pytest.fixture(scope="session")
def testdata_dir():
    return TESTDATA
