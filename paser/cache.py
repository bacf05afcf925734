"""Where paser keeps what it makes once (converted models, the pruned twins, Prefect's home), and
how a made folder or file appears there whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where paser keeps converted models: $PASER_CACHE_DIR, else $XDG_CACHE_HOME/paser, else ~/.cache/paser."""
    if os.environ.get("PASER_CACHE_DIR"):
        return Path(os.environ["PASER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paser"


def converted_folder(path: Path, label: str = "") -> Path:
    """Where a model file's one-time conversion is cached: keyed by the file's resolved path, size
    and modification time."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{label}{key}"


def write_folder(target: Path, write, marker: str) -> Path:
    """``write(folder)`` into a temporary folder renamed to ``target`` when done, so an interrupted
    conversion leaves nothing behind; ``marker`` is the file a finished folder has (another
    process may have won the race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / marker).is_file():
            raise
    return target


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON so that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
