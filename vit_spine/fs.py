"""Files that are either whole or absent, folders one process at a time, and damage that is detected.

- `flush_to_disk`, `flush_folder_files`, `durable_replace`, `write_json_atomic`, `write_text_atomic`: a file
  or folder that marks work as done is renamed into place only after its data is on disk (fsync), so a
  kill or a power loss never leaves something that looks complete but is not.
- `FolderLock`: one process per output folder (an advisory `fcntl.flock` on a lock file in it). The kernel
  releases the lock when its holder dies, so a lock left by a dead process is simply taken over.
- `file_record` / `check_files`: the size and CRC-32 of the files a shard or checkpoint is made of,
  recorded when they are written and checked when they are read. CRC-32 (zlib) runs at about 1 GB/s
  and is in the standard library (no extra package on GPU machines): fast enough to verify a 350 MB
  checkpoint at load time; a 0.8 GB shard is checked by size always and by checksum on request.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".vit-spine.lock"
_CHUNK = 1 << 22  # bytes read at a time while checksumming


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock."""


class DamagedFile(ValueError):
    """A recorded file is missing, of another size, or its checksum differs."""


# ---------------------------------------------------------------- durable writes


def flush_to_disk(path: Path) -> None:
    """fsync a file, or a folder's entries. A rename that marks work as done (a shard folder, a
    checkpoint's vit_spine.json) must come after its data is on disk: after a power loss, resuming
    would otherwise trust a file the page cache never wrote. Filesystems without fsync are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def flush_folder_files(folder: Path) -> None:
    """fsync the files directly in `folder` (not its subfolders), then the folder's entries."""
    for path in sorted(folder.iterdir()):
        if path.is_file():
            flush_to_disk(path)
    flush_to_disk(folder)


def durable_replace(source: Path, target: Path) -> None:
    """os.replace with the data flushed before and the folder's new entry after."""
    flush_to_disk(source)
    os.replace(source, target)
    flush_to_disk(target.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, flushed, then renamed.

    The temporary name is fixed per target (the folder lock keeps writers apart), so a write killed
    half-way leaves a `.tmp-NAME` that the next write of the same file simply replaces.
    """
    path = Path(path)
    partial = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        partial.write_bytes(data)
        durable_replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`write_bytes_atomic` of `text` (UTF-8)."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, content: Any, indent: int = 1) -> bool:
    """`write_text_atomic` of `content` as JSON; skipped (returns False) when the file already holds it."""
    text = json.dumps(content, indent=indent) + "\n"
    if Path(path).is_file() and Path(path).read_text() == text:
        return False
    write_text_atomic(Path(path), text)
    return True


# ---------------------------------------------------------------- one process per folder


class FolderLock:
    """`with FolderLock(folder, "train"):` -- fails with FolderInUse, naming the PID, when a live process holds it.

    `name` lets processes that may share a folder lock apart (chunk's ranks each take their own).
    The lock file stays in the folder (removing it would race with a process opening it); it holds the
    PID, host, command and start time of the last holder.
    """

    def __init__(self, folder: str | Path, command: str, name: str = LOCK_FILE) -> None:
        self.folder, self.command, self.path = Path(folder), command, Path(folder) / name
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> FolderLock:
        self._created = not self.folder.exists()  # a refused command must not leave an empty folder behind
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUse(
                f"{self.folder} is in use by PID {holder.get('pid', '?')} ({holder.get('command', 'vit-spine')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); wait for it to finish, or stop it"
            ) from None
        previous = _read_holder(fd)
        if previous.get("pid") and previous.get("host") == socket.gethostname() and not _alive(previous["pid"]):
            print(f"note: {self.path}: taking over the lock of PID {previous['pid']}, which is no longer running",
                  file=sys.stderr)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._fd is None:
            return
        if exc_type is not None and self._created and [p.name for p in self.folder.iterdir()] == [self.path.name]:
            self.path.unlink()
            self.folder.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


# ---------------------------------------------------------------- damage detection


def crc32_of(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits."""
    value = 0
    with open(path, "rb") as fp:
        while chunk := fp.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def file_record(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {"size", "crc32"}} of the given files in `folder` (default: every file directly in it)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if names is None else names
    return {name: {"size": (folder / name).stat().st_size, "crc32": crc32_of(folder / name)} for name in names}


def check_files(folder: Path, record: dict[str, dict[str, Any]], checksums: bool) -> list[str]:
    """What differs between `folder` and its `file_record` (missing files, sizes, checksums when asked); [] when whole."""
    folder = Path(folder)
    damage = []
    for name, expected in record.items():
        path = folder / name
        if not path.is_file():
            damage.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            damage.append(f"{name} has {size} bytes, {expected['size']} were written")
        elif checksums and crc32_of(path) != expected["crc32"]:
            damage.append(f"{name} has another checksum than was written (crc32 {expected['crc32']})")
    return damage
