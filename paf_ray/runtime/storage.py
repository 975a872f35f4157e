"""Filesystem helpers for every path a user gives: local paths or URIs (file://, s3://, gs://...).

Every reader (dataset index, loader, checkpoints, run logs) goes through these few
functions, so a path on object storage needs no special case anywhere else. URIs are
resolved with ``pyarrow.fs.FileSystem.from_uri``; plain paths use the local filesystem.
Object-storage credentials and endpoints come from the standard settings (AWS_* /
GOOGLE_* environment variables, instance roles).

Files that must be local (pretrained weights, checkpoints) are fetched once per node into
this node's cache (``local_file``, ``local_dir``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=32)
def _filesystem_for(scheme_and_host: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_host + "/")
    return fs


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


def list_files(path: str) -> list[str]:
    """Names (not paths) of the files directly under a directory, sorted; [] if it does not exist."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=False))
    return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)


def list_dirs(path: str) -> list[str]:
    """Names of the folders directly under a folder, sorted; [] if it does not exist."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=False))
    return sorted(os.path.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


def list_file_infos(path: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files directly under a folder, sorted; [] if it does not exist."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=False))
    return sorted((os.path.basename(i.path), int(i.size), int(i.mtime_ns or 0))
                  for i in infos if i.type == pafs.FileType.File)


def file_info(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when there is none."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    return (int(info.size), int(info.mtime_ns or 0)) if info.type == pafs.FileType.File else None


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def file_size(path: str) -> int:
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    return int(info.size)


def read_bytes(path: str) -> bytes:
    """The whole file; FileNotFoundError (naming the path) when it is missing."""
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{path}: no such file") from None
        raise OSError(f"{path}: cannot read: {e}") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (parent folders are created)."""
    fs, inner = resolve(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def upload_file(local_path: str, path: str) -> None:
    """Copy one local file to `path` (a local path or URI)."""
    fs, inner = resolve(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    pafs.copy_files(local_path, inner, destination_filesystem=fs)


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
    info = fs.get_file_info(inner)
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
        fd, tmp = tempfile.mkstemp(dir=slot, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(inner) as src:
                shutil.copyfileobj(src, out, 8 * 2**20)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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
    files = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
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
                with open(os.path.join(tmp, rel), "wb") as out, fs.open_input_stream(f"{inner}/{rel}") as src:
                    shutil.copyfileobj(src, out, 8 * 2**20)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    return final
