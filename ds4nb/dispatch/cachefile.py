"""The dispatcher's JSON cache files in the user cache dir: entries by key, read leniently, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_entries(path: Path) -> dict:
    """The file's entries; an unreadable or malformed file counts as empty (the next write replaces it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_entries(path: Path, entries: dict) -> None:
    """Write atomically (a temporary file, then ``os.replace``); a cache that cannot be written is only a cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
