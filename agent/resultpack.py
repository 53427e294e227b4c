"""A run's results as one archive: what the job left under ``$FLEXMESH_OUTPUT``, packed by
its owner when it ended, to be fetched by its origin.

The tree was written by the job, so it is packed as hostile input, with the rules of a
workdir (``bundle``): nothing is followed through a link (every entry is opened relative
to its directory's descriptor with ``O_NOFOLLOW``), only directories, regular files and
symbolic links that stay in the tree are packed, every file must be readable by the job's
user (a hard link to a file it may not read is not packed), and the archive is
deterministic. Unlike a workdir, a bad entry does not refuse the whole: it is skipped and
counted. What does not fit ``max_bytes`` (the archive's size) or ``max_files`` (entries)
is left out, walking in sorted order, and the note says so: "results cut at N of M bytes".

Functions here block (file I/O): the runtime calls them on a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from flexmesh.agent.bundle import MAX_DEPTH, Reader, may_read

BLOCK = 512  # tar's block: every header and every file's data is padded to it


@dataclass(frozen=True, slots=True)
class ResultsPacked:
    sha256: str
    size: int  # bytes of the archive
    files: int  # entries packed
    packed_bytes: int  # bytes of file data packed ...
    total_bytes: int  # ... of those the tree held
    left_out: int  # entries not packed for the limits
    skipped: int  # entries not packed as unsafe (links out, devices, unreadable)

    @property
    def note(self) -> str:
        """What a person should know of these results ("" when all of them are here)."""
        parts = []
        if self.packed_bytes < self.total_bytes or self.left_out:
            parts.append(f"results cut at {self.packed_bytes} of {self.total_bytes} bytes "
                         f"({self.left_out} entries left out: max_results or max_files)")
        if self.skipped:
            parts.append(f"{self.skipped} entries skipped (links out of the directory, "
                         "devices, fifos, sockets or files the job's user may not read)")
        return "; ".join(parts)


class _Sink:
    """What tarfile writes to: a file, hashed and counted."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.size, self.hash = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self.hash.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class _Walker:
    def __init__(self, tar: tarfile.TarFile, reader: Reader, max_bytes: int,
                 max_files: int) -> None:
        self.tar, self.reader = tar, reader
        # Room for the archive's end (two zero blocks, padded to tar's record of 10 KiB).
        self.room = max_bytes - 20 * BLOCK
        self.max_files = max_files
        self.files = self.packed = self.total = self.left_out = self.skipped = 0

    def _fits(self, path: str, size: int = 0, link: str = "",
              kind: bytes = tarfile.REGTYPE) -> bool:
        # Its header as the archive writes it (with a PAX header for a long or non-ASCII
        # name or link, or a size tar's field cannot hold), and its data, padded.
        info = self._info(path, kind, 0, size, link)
        header = len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
        need = header + _padded(size)
        if self.files >= self.max_files or need > self.room:
            self.left_out += 1
            return False
        self.room -= need
        self.files += 1
        return True

    def _add(self, name: str, kind: bytes, mode: int, size: int = 0, link: str = "",
             f: IO[bytes] | None = None) -> None:
        self.tar.addfile(self._info(name, kind, mode, size, link), f)

    @staticmethod
    def _info(name: str, kind: bytes, mode: int, size: int, link: str) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, link
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    def walk(self, dirfd: int, rel: str, depth: int) -> None:
        with os.scandir(dirfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = posixpath.join(rel, name) if rel else name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # (gone while it was packed)
            if stat.S_ISLNK(st.st_mode):
                self._link(dirfd, name, path)
            elif stat.S_ISDIR(st.st_mode):
                self._dir(dirfd, name, path, depth)
            elif stat.S_ISREG(st.st_mode):
                self.total += st.st_size
                self._file(dirfd, name, path)
            else:
                self.skipped += 1

    def _dir(self, dirfd: int, name: str, path: str, depth: int) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
        except OSError:
            self.skipped += 1  # (replaced by a link, or not ours to open)
            return
        try:
            if depth >= MAX_DEPTH or not may_read(os.fstat(fd), self.reader, True):
                self.skipped += 1
            elif self._fits(path, kind=tarfile.DIRTYPE):
                self._add(path, tarfile.DIRTYPE, 0o755)
                self.walk(fd, path, depth + 1)
        finally:
            os.close(fd)

    def _link(self, dirfd: int, name: str, path: str) -> None:
        target = os.readlink(name, dir_fd=dirfd)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
            self.skipped += 1
        elif self._fits(path, link=target, kind=tarfile.SYMTYPE):
            self._add(path, tarfile.SYMTYPE, 0o777, link=target)

    def _file(self, dirfd: int, name: str, path: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        except OSError:
            self.skipped += 1
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not may_read(st, self.reader, False):
                self.skipped += 1
            elif self._fits(path, st.st_size):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                # (a file that shrinks meanwhile: tarfile raises OSError, the pack fails)
                self._add(path, tarfile.REGTYPE, mode, st.st_size, f=f)
                self.packed += st.st_size


def pack_results(src: Path, dest_dir: Path, reader: Reader, max_bytes: int,
                 max_files: int) -> ResultsPacked:
    """Pack directory ``src`` into ``dest_dir/SHA256.tar``, as much of it as fits.
    OSError if ``src`` cannot be opened or the archive cannot be written."""
    top = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".pack-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f)
            with tarfile.open(fileobj=cast(IO[bytes], sink), mode="w",
                              format=tarfile.PAX_FORMAT) as tar:
                walker = _Walker(tar, reader, max_bytes, max_files)
                walker.walk(top, "", 0)
        sha = sink.hash.hexdigest()
        os.replace(tmp, dest_dir / f"{sha}.tar")
    finally:
        os.close(top)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ResultsPacked(sha, sink.size, walker.files, walker.packed, walker.total,
                         walker.left_out, walker.skipped)


def list_results(archive: Path, limit: int = 1000) -> list[dict[str, object]]:
    """The regular files of a results archive, with their sizes (at most ``limit``)."""
    out: list[dict[str, object]] = []
    with tarfile.open(archive, mode="r:") as tar:
        for m in tar:
            if len(out) >= limit:
                break
            if m.isreg():
                out.append({"name": m.name, "size": m.size})
    return out
