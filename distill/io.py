"""Atomic artifact writes (temp file in the same folder, then rename) and small JSON helpers."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (/proc/self/status), else by the
    set-and-restore idiom."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the umask (0o644 under the usual 022)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it is renamed over `path`, on error removed.

    mkstemp creates the temp file 0600 (private); it is given the mode a plain open() would give
    (0o666 & ~umask, usually 0644) so a service running as another user can read the artifact.
    Folders are created by mkdir with its usual 0o777 & ~umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # after the writer: some (safetensors) replace the temp file with a new 0600 one
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_readable(folder: Path) -> None:
    """Give every file under `folder` the mode a plain open() gives (0o666 & ~umask): for files that a library
    wrote itself (safetensors, and so peft's save_pretrained, creates them 0600)."""
    mode = file_mode()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def _default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_default))


def read_json(path: Path, stage_hint: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run {stage_hint} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e}); delete it and run {stage_hint} again") from e
