"""Ray's token auth as a client sees it: where the token comes from, the header that carries it.

A Ray 2.60 cluster started with token auth (RAY_AUTH_MODE=token) refuses dashboard and job
requests without ``Authorization: Bearer <token>`` (``paf-ray submit``, the cluster check).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def find_auth_token() -> Optional[str]:
    """The token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (first found)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser())
    candidates.append(Path.home() / ".ray" / "auth_token")
    for candidate in candidates:
        if candidate.is_file():
            token = candidate.read_text(encoding="utf-8").strip()
            if token:
                return token
    return None


def auth_headers() -> dict[str, str]:
    """A bearer header when a token is available and auth is not explicitly disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = find_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
