"""Atomic JSON checkpoints for resumable searches: write to a temporary file in the same folder,
flush and fsync it, then ``os.replace`` it over the target, so a killed run leaves either the old
or the new checkpoint, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json_atomic(path: "str | os.PathLike", data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: "str | os.PathLike") -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
