"""Staging: output written under a hidden name, published by an atomic rename. Files go through a temporary file
beside them (`write_atomically`); folders through a staging folder that records its owner, cleaned up after
processes that were killed before they could clean up themselves.

A staging folder is `.<target>.<kind>-<host>-<pid>-<random>` beside its target. Only folders of this host
whose process is gone are touched, so a conversion running on another machine of a shared filesystem, or in
another process here, is never disturbed.
"""

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

STAGING_NAME = re.compile(r"\.(?P<target>.+)\.(?P<kind>building|replaced)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")
BUILDING, REPLACED = "building", "replaced"


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def staging_folder(target: Path, kind: str = BUILDING) -> Path:
    """A new empty folder beside `target`, named for this host and process."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{_host()}-{os.getpid()}-", dir=target.parent))


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a hidden temporary file beside `path`, then rename it to `path`: a failure never leaves a
    half-written file, and whatever `path` held stays until the new file is complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def umask() -> int:
    """The process's umask: from /proc where there is one (reading it elsewhere means setting it for a moment)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the permissions the user's umask gives new files and folders: staging
    folders (`tempfile.mkdtemp`) and safetensors files (written through a private temporary file) are 0700/0600."""
    mask = umask()
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_staging(parent: Path) -> None:
    """Remove the staging folders in `parent` left by dead processes of this host. A target moved aside (into a
    `replaced` folder) whose replacement never arrived is put back instead of removed."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        match = STAGING_NAME.fullmatch(path.name)
        if not match or match["host"] != _host() or process_alive(int(match["pid"])):
            continue
        target, moved_aside = parent / match["target"], path / match["target"]
        if match["kind"] == REPLACED and moved_aside.exists() and not target.exists() and not target.is_symlink():
            os.rename(moved_aside, target)
        shutil.rmtree(path, ignore_errors=True)
