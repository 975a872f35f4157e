"""Shared fixtures: one local Ray for the whole session, a small synthetic BDD100K root.

HOME points at a private folder for the session: a Ray that starts here writes its auth
token under ~/.ray, and that must never switch another cluster on this machine to token auth.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

_HOME = tempfile.mkdtemp(prefix="paf_ray_test_home_")
os.environ["HOME"] = _HOME


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint of `s3_endpoint` is named in the environment before anything starts, so every
# process of the session (the local Ray, its workers, CLI subprocesses) inherits the standard
# AWS settings whatever order fixtures come in; the server itself starts only when a test asks.
_S3_PORT = _free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

# Real reference data carried by the repository (provenance and licences: tests/data/NOTICE).
TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(autouse=True)
def registries_as_shipped():
    """A test that registers a plug-in must undo it: a Ray worker never imports the test module,
    so a config written by a later test must not name an entry only this process knows."""
    from paf_ray.models.adapters import ADAPTERS
    from paf_ray.models.backbones import BACKBONES
    from paf_ray.tasks import TASKS

    before = {r.what: r.names() for r in (TASKS, BACKBONES, ADAPTERS)}
    yield
    after = {r.what: r.names() for r in (TASKS, BACKBONES, ADAPTERS)}
    assert after == before, f"a test left plug-ins registered: {after} (before: {before})"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs and the dashboard (Tune's early-stop cleanup needs it)."""
    import ray

    from paf_ray.runtime.ray import init_ray

    init_ray(address="local", num_cpus=2, object_store_mb=512)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic dataset in the official layout (shared by tests; do not modify)."""
    from paf_ray.data.bdd100k.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(str(root), images=32, seed=0, size=(320, 180), val_fraction=0.25)
    return str(root)


@pytest.fixture(scope="session")
def testdata_dir():
    return TESTDATA


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto_server) on 127.0.0.1: yields (endpoint_url, bucket).

    The AWS_* variables are already set for the session (see the top of this file). Tests
    write below their own prefix in the bucket (e.g. s3://BUCKET/<test name>/).
    """
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    log = open(os.path.join(_HOME, "moto_server.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(_S3_PORT)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint} (log: {log.name})") from None
                time.sleep(0.2)
        import boto3

        bucket = "paf-test"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint, bucket
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
