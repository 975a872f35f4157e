"""Small whole-file I/O on local paths and URIs: every output is written whole or not at all.

An object store replaces an object at once when its upload completes; a local file is written
under a temporary name in its folder and renamed into place, so a reader (or a rerun after a
crash) never sees half a file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from paf_ray.runtime import storage


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (a local path or URI); parent folders are created."""
    if storage.is_remote(path):
        storage.write_bytes(path, data)
        return
    local = storage.local_path(os.path.expanduser(path))
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    except OSError as e:
        if e.filename is None:  # a failed write (a full disk) names no file: the error line must
            raise OSError(e.errno, e.strerror, local) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float))


def read_json(path: str) -> Any | None:
    """The parsed JSON file, None when it does not exist; a malformed file is an error naming it."""
    if not storage.exists(path):
        return None
    data = storage.read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
