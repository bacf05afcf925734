"""Where paser keeps what it makes once (converted models, the pruned twins, Prefect's home), and
how a made folder or file appears there whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from paser.errors import DataError


def cache_dir() -> Path:
    """Where paser keeps converted models: $PASER_CACHE_DIR, else $XDG_CACHE_HOME/paser, else ~/.cache/paser."""
    if os.environ.get("PASER_CACHE_DIR"):
        return Path(os.environ["PASER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paser"


def file_identity(path: str | Path) -> str:
    """A file's resolved path, size and modification time: what paser's fingerprints know of a file
    (its content is never read, so a fingerprint of a 14 GB checkpoint costs a ``stat``)."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def files_fingerprint(path: str | Path) -> str:
    """16 hex digits identifying a file, or every file in a folder, by resolved path, names (relative
    to the folder), sizes and modification times."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def converted_folder(path: Path, label: str = "") -> Path:
    """Where a model file's one-time conversion is cached: keyed by the file's identity."""
    key = hashlib.sha256(file_identity(path).encode()).hexdigest()[:16]
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


def read_appended_jsonl(path: Path, valid, damaged) -> list[dict]:
    """The records of a JSONL file that paser appends to as work finishes (and a kill may cut off):
    a last line that does not parse or fails ``valid`` is dropped (its work is done again); such a
    line before it raises ``DataError(damaged(line number))``."""
    # split at newlines only: a record may hold U+2028, which str.splitlines would also split at
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and valid(record)
        except ValueError:
            ok = False
        if not ok:
            if n == len(lines):
                break
            raise DataError(damaged(n))
        records.append(record)
    return records
