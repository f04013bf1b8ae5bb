"""Tracking-store addresses as strings, for every package (no MLflow import here).

`DEFAULT_TRACKING_URI` is where sweeps log and reports read by default; `redact_uri` strips
credentials before an address is printed, tagged or written into a report.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["DEFAULT_TRACKING_URI", "redact_uri"]

#: a sqlite file in the working directory
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def redact_uri(uri: str) -> str:
    """`http://user:secret@host:5000` -> `http://host:5000` (anything without credentials is kept)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
