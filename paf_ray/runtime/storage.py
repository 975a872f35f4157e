"""Filesystem helpers for every path a user gives: local paths or URIs (file://, s3://, gs://...).

Every reader (dataset index, loader, checkpoints, run logs) goes through these few
functions, so a path on object storage needs no special case anywhere else. URIs are
resolved with ``pyarrow.fs.FileSystem.from_uri``; plain paths use the local filesystem.
Object-storage credentials and endpoints come from the standard settings (AWS_* /
GOOGLE_* environment variables, instance roles).

Files that must be local (pretrained weights, checkpoints) are fetched once per node into
this node's cache (``local_file``, ``local_dir``).

Object storage fails now and then (timeouts, refused connections, 503 SlowDown). Two layers
retry (docs/reliability.md has the bounds): every S3 request, through the AWS SDK's retry
strategy with the timeouts below (the same filesystem is given to Ray Train); and every
operation of this module on a URI, as a whole, with backoff (``_retrying``). An operation
that still fails raises ``StorageError``: one line naming the URI and the operation.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
from urllib.parse import urlparse

import pyarrow.fs as pafs


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# Every S3 request: a connection must open within S3_CONNECT_TIMEOUT_S; a request during which no byte
# moves for S3_REQUEST_TIMEOUT_S is abandoned (curl's low-speed limit); the AWS SDK's standard
# strategy retries timeouts, connection errors, 5xx and SlowDown up to S3_MAX_ATTEMPTS attempts in all,
# with growing random waits (at most 20 s). One request gives up after ~2.5 min of a lasting outage
# (measured: 150 s refused, 163 s stalled). pyarrow's defaults (3 s, 3 attempts) gave up after ~10 s.
S3_CONNECT_TIMEOUT_S = _env_float("PAF_RAY_S3_TIMEOUT_S", 10.0)
S3_REQUEST_TIMEOUT_S = _env_float("PAF_RAY_S3_TIMEOUT_S", 10.0)
S3_MAX_ATTEMPTS = int(_env_float("PAF_RAY_S3_ATTEMPTS", 10))
# Each operation of this module on a URI (a read, a listing, an upload, a fetch into the node cache):
# retried whole on a transient error, waiting 2, 4, 8, 16, 30, 30 ... s (x 0.5-1 at random), while
# fewer than STORAGE_RETRY_ATTEMPTS attempts were made and less than STORAGE_RETRY_S seconds passed.
STORAGE_RETRY_S = _env_float("PAF_RAY_STORAGE_RETRY_S", 120.0)
STORAGE_RETRY_ATTEMPTS = 6
RETRY_FIRST_WAIT_S = 2.0
RETRY_MAX_WAIT_S = 30.0

# Marks of an error that may pass: pyarrow's AWS errors (network, throttling, 5xx) and GCS's codes.
_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "THROTTLING",
              "REQUEST_TIMEOUT", "(HTTP status 5", "curlCode", "UNAVAILABLE", "DEADLINE_EXCEEDED",
              "RESOURCE_EXHAUSTED", "Connection reset", "timed out")


class StorageError(OSError):
    """An operation on object storage that failed after its retries; the message is one line
    naming the URI and the operation."""


def is_transient(error: BaseException) -> bool:
    """A timeout, a connection error, a 5xx or a SlowDown: worth another try. Never a missing
    object or bucket, or a refused permission."""
    if isinstance(error, StorageError):
        return False  # already retried
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    return isinstance(error, OSError) and any(mark in str(error) for mark in _TRANSIENT)


def short_error(error: BaseException) -> str:
    """The useful part of a pyarrow storage error, on one line: "AWS Error NETWORK_CONNECTION during
    HeadObject operation: curlCode: 28, Timeout was reached" (the key and bucket are left out: the
    URI is named next to it)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r"^When [^:]*?(?:key|bucket) '[^']*'(?: in bucket '[^']*')?: ", "", text)
    return text.split("; Details:")[0]


def _retrying(op: str, path: str, fn):
    """fn() for an operation on `path`, retried on transient errors when `path` is on object storage."""
    if not is_remote(path):
        return fn()
    start = time.monotonic()
    for attempt in range(1, STORAGE_RETRY_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - start
            wait = min(RETRY_MAX_WAIT_S, RETRY_FIRST_WAIT_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if attempt == STORAGE_RETRY_ATTEMPTS or elapsed + wait > STORAGE_RETRY_S:
                raise StorageError(
                    f"{path}: {op} failed on object storage after {attempt} attempt(s) in {elapsed:.0f} s: "
                    f"{short_error(e)}") from e
            print(f"[paf-ray] storage: {op} {path}: {short_error(e)}; retry {attempt}/{STORAGE_RETRY_ATTEMPTS - 1} "
                  f"in {wait:.1f} s", file=sys.stderr, flush=True)
            time.sleep(wait)


def is_uri(path: str) -> bool:
    return "://" in path


class TunedS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with this module's timeouts and retry strategy.

    pyarrow pickles an S3FileSystem without its retry strategy (pyarrow 26), so Ray Train's
    controller and workers, which get the filesystem pickled, would be back at the SDK's default
    of 3 attempts: this one pickles its settings and is rebuilt with them."""

    def __init__(self, options: dict, max_attempts: int):
        super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts))
        self.options, self.max_attempts = options, max_attempts

    def __reduce__(self):
        return TunedS3FileSystem, (self.options, self.max_attempts)


def _tuned(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem as pyarrow resolved it (endpoint, region, credentials from the standard
    settings) with our timeouts and retries; other filesystems as they are."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    reduced = fs.__reduce__()  # (rebuild, (the constructor's keyword arguments,))
    options = dict(reduced[1][0]) if len(reduced) > 1 and reduced[1] and isinstance(reduced[1][0], dict) else None
    if options is None:
        return fs
    options.update(connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S)
    return TunedS3FileSystem(options, S3_MAX_ATTEMPTS)


@functools.lru_cache(maxsize=32)
def _filesystem_for(scheme_and_host: str) -> pafs.FileSystem:
    fs, _ = _retrying("open", scheme_and_host, lambda: pafs.FileSystem.from_uri(scheme_and_host + "/"))
    return _tuned(fs)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """A path or URI -> (pyarrow filesystem, path inside it)."""
    if not is_uri(path):
        return _local(), os.path.abspath(path)
    parsed = urlparse(path)
    if parsed.scheme == "file":
        return _local(), parsed.path
    if parsed.scheme in ("s3", "gs", "gcs"):
        # One filesystem per bucket: building one (credentials, region lookup) is slow.
        return _filesystem_for(f"{parsed.scheme}://{parsed.netloc}"), f"{parsed.netloc}{parsed.path}"
    return pafs.FileSystem.from_uri(path)


@functools.lru_cache(maxsize=1)
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


def normalize_root(root: str) -> str:
    """Absolute local path, or the URI without a trailing slash."""
    if is_uri(root):
        return root.rstrip("/")
    return os.path.abspath(root)


def join(root: str, *parts: str) -> str:
    """Join path parts below a local root or a URI."""
    if is_uri(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(root, *parts)


def _listing(path: str) -> list[pafs.FileInfo]:
    fs, inner = resolve(path)
    return _retrying("list", path, lambda: fs.get_file_info(
        pafs.FileSelector(inner, allow_not_found=True, recursive=False)))


def _stat(path: str) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return _retrying("stat", path, lambda: fs.get_file_info(inner))


def list_files(path: str) -> list[str]:
    """Names (not paths) of the files directly under a directory, sorted; [] if it does not exist."""
    return sorted(os.path.basename(i.path) for i in _listing(path) if i.type == pafs.FileType.File)


def list_dirs(path: str) -> list[str]:
    """Names of the folders directly under a folder, sorted; [] if it does not exist."""
    return sorted(os.path.basename(i.path.rstrip("/")) for i in _listing(path) if i.type == pafs.FileType.Directory)


def list_file_infos(path: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files directly under a folder, sorted; [] if it does not exist."""
    return sorted((os.path.basename(i.path), int(i.size), int(i.mtime_ns or 0))
                  for i in _listing(path) if i.type == pafs.FileType.File)


def file_info(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when there is none."""
    info = _stat(path)
    return (int(info.size), int(info.mtime_ns or 0)) if info.type == pafs.FileType.File else None


def exists(path: str) -> bool:
    return _stat(path).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    return _stat(path).type == pafs.FileType.Directory


def file_size(path: str) -> int:
    info = _stat(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return int(info.size)


def read_bytes(path: str) -> bytes:
    """The whole file; FileNotFoundError (naming the path) when it is missing."""
    fs, inner = resolve(path)

    def read() -> bytes:
        try:
            with fs.open_input_stream(inner) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except OSError as e:
            if is_transient(e):
                raise
            if fs.get_file_info(inner).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{path}: no such file") from None
            raise OSError(f"{path}: cannot read: {e}") from None

    return _retrying("read", path, read)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (parent folders are created)."""
    fs, inner = resolve(path)

    def write() -> None:
        fs.create_dir(os.path.dirname(inner), recursive=True)
        with fs.open_output_stream(inner) as f:
            f.write(data)

    _retrying("write", path, write)


def upload_file(local_path: str, path: str) -> None:
    """Copy one local file to `path` (a local path or URI)."""
    fs, inner = resolve(path)

    def upload() -> None:
        fs.create_dir(os.path.dirname(inner), recursive=True)
        pafs.copy_files(local_path, inner, destination_filesystem=fs)

    _retrying("upload", path, upload)


def ray_storage(path: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: a local path as it is; a URI as
    its path inside this module's filesystem (Ray wants the scheme stripped when it is given
    a filesystem), so Ray Train's own storage calls get the same timeouts and retries."""
    if not is_remote(path):
        return local_path(path), None
    fs, inner = resolve(path)
    return inner, fs


# --------------------------------------------------------------------------- this node's cache


def cache_dir() -> str:
    """This node's cache folder: $PAF_RAY_CACHE, else ~/.cache/paf_ray."""
    return os.environ.get("PAF_RAY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "paf_ray"))


def is_remote(path: str) -> bool:
    """A URI whose files are not on this node's disk (anything but a plain path or file://)."""
    return is_uri(path) and urlparse(path).scheme != "file"


def local_path(path: str) -> str:
    """The absolute local path of a plain path or file:// URI."""
    return resolve(path)[1]


@contextlib.contextmanager
def _node_lock(path: str):
    """An exclusive lock between the processes of this node (flock on `path`)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_slot(path: str, fingerprint: str) -> str:
    key = hashlib.sha256(f"{path}\n{fingerprint}".encode()).hexdigest()[:24]
    folder = os.path.join(cache_dir(), "fetched")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, key)


def _info(fs: pafs.FileSystem, inner: str, path: str) -> pafs.FileInfo:
    info = _retrying("stat", path, lambda: fs.get_file_info(inner))
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or folder")
    return info


def _fingerprint(info: pafs.FileInfo) -> str:
    return f"{info.size}:{info.mtime_ns}"


def local_file(path: str) -> str:
    """A local file with the content of `path`: the path itself when it is local, else a copy
    in this node's cache.

    The copy is keyed by the URI, size and modification time, so a changed object is fetched
    again; it is written to a temporary file and renamed into place under a per-node lock, so
    several worker processes asking at once fetch it once and never see a partial file.
    """
    if not is_remote(path):
        return local_path(os.path.expanduser(path))
    fs, inner = resolve(path)
    info = _info(fs, inner, path)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{path}: a folder, not a file")
    slot = _cache_slot(path, _fingerprint(info))
    final = os.path.join(slot, os.path.basename(inner))  # keeps the suffix (.safetensors, .pkl ...)
    if os.path.exists(final):
        return final
    with _node_lock(slot + ".lock"):
        if os.path.exists(final):
            return final
        os.makedirs(slot, exist_ok=True)

        def fetch() -> None:
            fd, tmp = tempfile.mkstemp(dir=slot, prefix=".part-")
            try:
                with os.fdopen(fd, "wb") as out, fs.open_input_stream(inner) as src:
                    shutil.copyfileobj(src, out, 8 * 2**20)
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

        _retrying("fetch", path, fetch)
    return final


def local_dir(path: str) -> str:
    """A local folder with the files of `path` (recursively): the path itself when local, else a
    copy in this node's cache, keyed by the URI and every file's name, size and modification time,
    fetched into a temporary folder and renamed into place under a per-node lock."""
    if not is_remote(path):
        return local_path(os.path.expanduser(path))
    fs, inner = resolve(path)
    inner = inner.rstrip("/")
    if _info(fs, inner, path).type != pafs.FileType.Directory:
        raise NotADirectoryError(f"{path}: not a folder")
    files = [i for i in _retrying("list", path, lambda: fs.get_file_info(pafs.FileSelector(inner, recursive=True)))
             if i.type == pafs.FileType.File]
    listing = sorted((os.path.relpath(i.path, inner), _fingerprint(i)) for i in files)
    final = _cache_slot(path.rstrip("/"), repr(listing))
    if os.path.isdir(final):
        return final
    with _node_lock(final + ".lock"):
        if os.path.isdir(final):
            return final
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".part-")
        try:
            for rel, _ in listing:
                os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)

                def fetch(rel=rel) -> None:
                    with open(os.path.join(tmp, rel), "wb") as out, fs.open_input_stream(f"{inner}/{rel}") as src:
                        shutil.copyfileobj(src, out, 8 * 2**20)

                _retrying("fetch", join(path, rel), fetch)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return final
