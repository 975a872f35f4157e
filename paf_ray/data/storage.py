"""Filesystem helpers for dataset roots that are local paths or URIs (file://, s3://, gs://...).

Every reader in paf_ray.data (index, check, the Ray Data loader) goes through these few
functions, so a root on object storage needs no special case anywhere else. URIs are
resolved with ``pyarrow.fs.FileSystem.from_uri``; plain paths use the local filesystem.
"""

from __future__ import annotations

import functools
import os
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
    """Write a whole file (its folder is created), local path or URI."""
    fs, inner = resolve(path)
    fs.create_dir(os.path.dirname(inner), recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(data)
