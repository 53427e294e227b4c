"""A job's working directory as one archive: packed at the origin, unpacked on the owner.

Packing is deterministic, so the same tree always gives the same SHA-256 (the bundle's
name, and what an owner's cache is keyed by): entries in sorted order, every mtime 0,
owner and group 0 with no names, modes normalised (0755 for directories and executables,
0644 for other files). Only directories, regular files and symbolic links that stay in the
tree are packed; anything else is refused with the path that is wrong. The agent packs as
root, so it reads nothing the submitter could not: every directory and file is checked
against the submitter's uid and groups, and nothing is followed through a link (each entry
is opened relative to its directory's descriptor with ``O_NOFOLLOW``).

Unpacking trusts nothing in the archive. Every member is checked before anything is
written (no absolute path, no ``..``, only files, directories and links confined to the
tree, no setuid, setgid or sticky bit, no sparse member, at most ``max_files`` members and
``max_bytes`` unpacked), then extracted with Python's ``data`` filter, which checks links
against what is already on disk. Any problem is one ``BundleError`` saying what is wrong.

Functions here block (file I/O): the runtime calls them on a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

BLOCK = 1 << 20  # bytes read or hashed at a time
MAX_DEPTH = 64  # directories nested deeper than this are refused


class BundleError(Exception):
    """A working directory that cannot be packed, or an archive that must not be unpacked;
    the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class Reader:
    """Who the tree is packed for: its files must be readable by this uid and groups
    (``uid`` None: whoever asks may read what the agent can)."""

    uid: int | None = None
    gids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Packed:
    sha256: str
    size: int  # bytes of the archive
    files: int  # entries in it


def may_read(st: os.stat_result, reader: Reader, directory: bool) -> bool:
    """Whether ``reader`` may read this file (a directory: list and enter it)."""
    if reader.uid is None or reader.uid == 0:
        return True
    if st.st_uid == reader.uid:
        bits = stat.S_IRUSR | (stat.S_IXUSR if directory else 0)
    elif st.st_gid in reader.gids:
        bits = stat.S_IRGRP | (stat.S_IXGRP if directory else 0)
    else:
        bits = stat.S_IROTH | (stat.S_IXOTH if directory else 0)
    return st.st_mode & bits == bits


def _may_search(st: os.stat_result, reader: Reader) -> bool:
    if reader.uid is None or reader.uid == 0:
        return True
    if st.st_uid == reader.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in reader.gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


class _Sink:
    """What tarfile writes to: a file, hashed and counted, refused beyond ``limit``."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self.f, self.limit, self.size = f, limit, 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise BundleError(f"the working directory packs to more than {_mib(self.limit)} "
                              "(max_bundle)")
        self.hash.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class _Packer:
    def __init__(self, tar: tarfile.TarFile, reader: Reader, max_files: int) -> None:
        self.tar, self.reader, self.max_files = tar, reader, max_files
        self.files = 0

    def _info(self, name: str, kind: bytes, mode: int, size: int = 0,
              link: str = "") -> tarfile.TarInfo:
        self.files += 1
        if self.files > self.max_files:
            raise BundleError(f"the working directory has more than {self.max_files} "
                              "entries (max_files)")
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, link
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    def walk(self, dirfd: int, rel: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise BundleError(f"{rel}: directories nested deeper than {MAX_DEPTH}")
        with os.scandir(dirfd) as it:
            names = sorted(e.name for e in it)
        for name in names:
            path = posixpath.join(rel, name) if rel else name
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self._link(dirfd, name, path)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dirfd)
                try:
                    self._check(os.fstat(fd), path, True)
                    self.tar.addfile(self._info(path, tarfile.DIRTYPE, 0o755))
                    self.walk(fd, path, depth + 1)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                self._file(dirfd, name, path)
            else:
                raise BundleError(f"{path}: not a regular file, directory or symbolic link")

    def _check(self, st: os.stat_result, path: str, directory: bool) -> None:
        if not may_read(st, self.reader, directory):
            raise BundleError(f"{path}: not readable by uid {self.reader.uid}")

    def _link(self, dirfd: int, name: str, path: str) -> None:
        target = os.readlink(name, dir_fd=dirfd)
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
            raise BundleError(f"{path}: a symbolic link to {target!r}, outside the directory")
        self.tar.addfile(self._info(path, tarfile.SYMTYPE, 0o777, link=target))

    def _file(self, dirfd: int, name: str, path: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{path}: changed while it was packed")
            self._check(st, path, False)
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            self.tar.addfile(self._info(path, tarfile.REGTYPE, mode, st.st_size), f)


def pack(src: str, dest_dir: Path, reader: Reader, max_bytes: int, max_files: int) -> Packed:
    """Pack directory ``src`` into ``dest_dir/SHA256.tar``; BundleError if it cannot be."""
    top = _open_top(src, reader)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".pack-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _Sink(f, max_bytes)
            with tarfile.open(fileobj=cast(IO[bytes], sink), mode="w",
                              format=tarfile.PAX_FORMAT) as tar:  # (closing: the end blocks)
                packer = _Packer(tar, reader, max_files)
                packer.walk(top, "", 0)
        sha = sink.hash.hexdigest()
        os.replace(tmp, dest_dir / f"{sha}.tar")
    except OSError as exc:
        raise BundleError(f"cannot pack {src}: {exc.strerror or exc}") from None
    finally:
        os.close(top)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Packed(sha, sink.size, packer.files)


def _open_top(src: str, reader: Reader) -> int:
    """The working directory, opened: absolute, a directory, reachable by ``reader``."""
    if not os.path.isabs(src):
        raise BundleError(f"workdir {src!r} must be an absolute path")
    real = os.path.realpath(src)
    parts = Path(real).parents
    try:
        for parent in reversed(parts):  # every directory above it must let the reader in
            if not _may_search(os.stat(parent), reader):
                raise BundleError(f"workdir {src}: {parent} is not searchable by uid "
                                  f"{reader.uid}")
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BundleError(f"workdir {src} does not exist") from None
    except NotADirectoryError:
        raise BundleError(f"workdir {src} is not a directory") from None
    except OSError as exc:
        raise BundleError(f"workdir {src}: {exc.strerror or exc}") from None
    if not may_read(os.fstat(fd), reader, True):
        os.close(fd)
        raise BundleError(f"workdir {src} is not readable by uid {reader.uid}")
    return fd


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
    return h.hexdigest()


# --- unpacking ------------------------------------------------------------------------------


def check_members(tar: tarfile.TarFile, max_bytes: int, max_files: int) -> None:
    """Refuse an archive with any member that must not be unpacked (see the header)."""
    total, links = 0, set()
    for count, m in enumerate(tar, 1):
        if count > max_files:
            raise BundleError(f"the archive has more than {max_files} entries")
        name = m.name
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or not name.strip("/."):
            raise BundleError(f"{name!r}: an absolute path or one that leaves the directory")
        if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
            raise BundleError(f"{name!r}: goes through a symbolic link")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()) or m.issparse():
            raise BundleError(f"{name!r}: a device, fifo or other special file")
        if m.mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
            raise BundleError(f"{name!r}: a setuid, setgid or sticky bit")
        if m.issym() or m.islnk():
            _check_link(m)
            links.add(name.rstrip("/"))
        total += m.size
        if total > max_bytes:
            raise BundleError(f"the archive unpacks to more than {_mib(max_bytes)}")


def _check_link(m: tarfile.TarInfo) -> None:
    base = posixpath.dirname(m.name) if m.issym() else ""
    resolved = posixpath.normpath(posixpath.join(base, m.linkname))
    if (posixpath.isabs(m.linkname) or resolved == ".." or resolved.startswith("../")
            or (not hasattr(tarfile, "data_filter") and ".." in m.linkname.split("/"))):
        raise BundleError(f"{m.name!r}: a link to {m.linkname!r}, outside the directory")


def unpack(archive: Path, dest: Path, max_bytes: int, max_files: int,
           owner: tuple[int, int] | None = None) -> None:
    """Unpack ``archive`` into ``dest`` (created, must not exist), then give the tree to
    ``owner`` (uid, gid). BundleError for a hostile or corrupt archive; ``dest`` is then
    removed again."""
    dest.mkdir(mode=0o700)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            check_members(tar, max_bytes, max_files)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # (before 3.11.4: the checks above refuse every link with "..")
                tar.extractall(dest)
        if owner is not None:
            _chown_tree(dest, *owner)
    except BundleError:
        remove_tree(dest)
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        remove_tree(dest)
        raise BundleError(f"the archive cannot be unpacked: {exc}") from None


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    for root, dirs, files in os.walk(top, topdown=False, followlinks=False):
        for name in (*files, *dirs):
            os.lchown(os.path.join(root, name), uid, gid)
    os.lchown(top, uid, gid)  # last: until now the job's user could not even look in


def remove_tree(path: Path) -> None:
    """Remove a job's directory, whatever its user made of it (read-only directories)."""
    def retry(func: Callable[[str], object], name: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            func(name)

    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=retry)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"
