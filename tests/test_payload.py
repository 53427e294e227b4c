"""Working directories: deterministic packing, safe unpacking of hostile archives, the
chunked fetch (a dropped connection, a resumed fetch, a bad hash) and the LRU store."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flexmesh.agent import bundlefetch
from flexmesh.agent.bundle import BundleError, Reader, pack, sha256_file, unpack
from flexmesh.agent.bundlecache import BundleCache
from flexmesh.agent.bundlefetch import FetchError, Want, fetch, read_chunk
from flexmesh.protocol import wire

MIB = 1 << 20


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _pack(src: Path, out: Path, **kw: int) -> str:
    return pack(str(src), out, Reader(), kw.get("max_bytes", 64 * MIB),
                kw.get("max_files", 1000)).sha256


# --- packing ---------------------------------------------------------------------------------


def test_the_same_tree_packs_to_the_same_hash(tmp_path: Path) -> None:
    files = {"a.txt": "alpha", "sub/b.py": "print(1)", "sub/deeper/c": "", "z": "zz"}
    one = _tree(tmp_path / "one", files)
    # The same content, made in another order, at other times, with other modes.
    two = _tree(tmp_path / "two", dict(reversed(files.items())))
    os.utime(two / "a.txt", (12345, 12345))
    os.utime(two / "sub", (99, 99))
    (two / "z").chmod(0o600)
    (one / "link").symlink_to("sub/b.py")
    (two / "link").symlink_to("sub/b.py")
    sha = _pack(one, tmp_path / "out")
    assert _pack(two, tmp_path / "out") == sha
    assert _pack(one, tmp_path / "out") == sha  # and again
    assert sha256_file(tmp_path / "out" / f"{sha}.tar") == sha
    with tarfile.open(tmp_path / "out" / f"{sha}.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.txt", "link", "sub", "sub/b.py", "sub/deeper",
                                         "sub/deeper/c", "z"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_content_an_executable_bit_or_a_name_changes_the_hash(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"run.sh": "echo hi"})
    out = tmp_path / "out"
    first = _pack(src, out)
    (src / "run.sh").chmod(0o755)
    executable = _pack(src, out)
    (src / "run.sh").write_text("echo ho")
    changed = _pack(src, out)
    (src / "run.sh").rename(src / "go.sh")
    renamed = _pack(src, out)
    assert len({first, executable, changed, renamed}) == 4


def test_packing_refuses_what_cannot_travel(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"a": "1", "b": "2", "c": "3"})
    out = tmp_path / "out"
    with pytest.raises(BundleError, match=r"more than 2 entries \(max_files\)"):
        _pack(src, out, max_files=2)
    (src / "big").write_bytes(b"\0" * (2 * MIB))
    with pytest.raises(BundleError, match=r"more than 1 MiB \(max_bundle\)"):
        _pack(src, out, max_bytes=MIB)
    (src / "big").unlink()
    (src / "out").symlink_to("../../etc")
    with pytest.raises(BundleError, match="outside the directory"):
        _pack(src, out)
    (src / "out").unlink()
    os.mkfifo(src / "fifo")
    with pytest.raises(BundleError, match="not a regular file"):
        _pack(src, out)
    with pytest.raises(BundleError, match="absolute path"):
        pack("relative/dir", out, Reader(), MIB, 10)
    assert not [p for p in out.iterdir() if p.name.startswith(".pack-")]  # nothing left


@pytest.fixture
def public_dir(open_tmp: Callable[[str, int], Path]) -> Path:
    """A directory others may enter (pytest's temporary directories are private)."""
    return open_tmp("flexmesh-pack-", 0o755)


def test_packing_reads_only_what_the_submitter_may(tmp_path: Path, public_dir: Path) -> None:
    """The agent packs as root: a file the submitter cannot read is refused, not packed."""
    src = _tree(public_dir / "src", {"open.txt": "ok", "sub/secret.txt": "no"})
    (src / "sub" / "secret.txt").chmod(0o600)
    me = os.stat(src / "open.txt")
    stranger = Reader(uid=me.st_uid + 4242, gids=frozenset({me.st_gid + 4242}))
    if not all(p.stat().st_mode & stat.S_IXOTH for p in src.parents):
        pytest.skip(f"{src.parent} is not searchable by others")
    with pytest.raises(BundleError, match=r"sub/secret\.txt: not readable by uid"):
        pack(str(src), tmp_path / "out", stranger, MIB, 10)
    (src / "sub" / "secret.txt").chmod(0o644)
    (src / "sub").chmod(0o700)
    with pytest.raises(BundleError, match=r"sub: not readable by uid"):
        pack(str(src), tmp_path / "out", stranger, MIB, 10)
    (src / "sub").chmod(0o755)
    assert pack(str(src), tmp_path / "out", stranger, MIB, 10).files == 3
    group = Reader(uid=me.st_uid + 4242, gids=frozenset({me.st_gid}))
    (src / "sub" / "secret.txt").chmod(0o640)  # readable by its group: the reader's
    assert pack(str(src), tmp_path / "out", group, MIB, 10).files == 3


def test_a_directory_above_the_workdir_must_let_the_submitter_in(tmp_path: Path) -> None:
    src = _tree(tmp_path / "locked" / "src", {"a": "1"})
    (tmp_path / "locked").chmod(0o700)
    me = os.stat(src / "a")
    stranger = Reader(uid=me.st_uid + 4242)
    with pytest.raises(BundleError, match="not searchable by uid"):
        pack(str(src), tmp_path / "out", stranger, MIB, 10)


# --- unpacking hostile archives ---------------------------------------------------------------


def _archive(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
            link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


HOSTILE = {
    "absolute path": ([(_member("/tmp/evil"), b"x")], "absolute path"),
    "dot-dot": ([(_member("ok/../../evil"), b"x")], "leaves the directory"),
    "absolute symlink": ([(_member("l", tarfile.SYMTYPE, link="/etc/passwd"), b"")],
                         "outside the directory"),
    "escaping symlink": ([(_member("d", tarfile.DIRTYPE, 0o755), b""),
                          (_member("d/l", tarfile.SYMTYPE, link="../../evil"), b"")],
                         "outside the directory"),
    "write through a symlink": ([(_member("l", tarfile.SYMTYPE, link="."), b""),
                                 (_member("l/evil"), b"x")], "through a symbolic link"),
    "symlink chain": ([(_member("q", tarfile.DIRTYPE, 0o755), b""),
                       (_member("q/s", tarfile.SYMTYPE, link=".."), b""),
                       (_member("t", tarfile.SYMTYPE, link="q/s/.."), b"")],
                      "outside"),
    "hard link outside": ([(_member("h", tarfile.LNKTYPE, link="../evil"), b"")],
                          "outside the directory"),
    "character device": ([(_member("null", tarfile.CHRTYPE), b"")], "special file"),
    "block device": ([(_member("sda", tarfile.BLKTYPE), b"")], "special file"),
    "fifo": ([(_member("pipe", tarfile.FIFOTYPE), b"")], "special file"),
    "setuid": ([(_member("su", mode=0o4755), b"#!/bin/sh\n")], "setuid"),
    "setgid directory": ([(_member("d", tarfile.DIRTYPE, 0o2755), b"")], "setgid"),
    "size bomb": ([(_member(f"f{i}"), b"\0" * 400_000) for i in range(3)],
                  "unpacks to more than"),
    "too many files": ([(_member(f"f{i}"), b"") for i in range(11)], "more than 10 entries"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_archive_is_refused_and_leaves_nothing(tmp_path: Path, kind: str) -> None:
    members, reason = HOSTILE[kind]
    archive = _archive(tmp_path / "bad.tar", *members)
    place = tmp_path / "work"
    place.mkdir()
    with pytest.raises(BundleError, match=reason):
        unpack(archive, place / "job", max_bytes=MIB, max_files=10)
    assert list(place.iterdir()) == []  # the run's directory is gone again
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_a_corrupt_archive_is_refused(tmp_path: Path) -> None:
    good = _archive(tmp_path / "good.tar", (_member("a"), b"x" * 5000))
    data = good.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    for name in ("cut.tar", "junk.tar"):
        with pytest.raises(BundleError):
            unpack(tmp_path / name, tmp_path / f"out-{name}", MIB, 10)
        assert not (tmp_path / f"out-{name}").exists()


def test_a_bundle_unpacks_to_the_tree_it_was_packed_from(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src", {"a.txt": "alpha", "sub/run.sh": "echo"})
    (src / "sub" / "run.sh").chmod(0o755)
    (src / "link").symlink_to("sub/run.sh")
    sha = _pack(src, tmp_path / "out")
    dest = tmp_path / "job"
    unpack(tmp_path / "out" / f"{sha}.tar", dest, MIB, 10, owner=(os.getuid(), os.getgid()))
    assert (dest / "a.txt").read_text() == "alpha"
    assert os.access(dest / "sub" / "run.sh", os.X_OK)
    assert os.readlink(dest / "link") == "sub/run.sh"
    assert stat.S_IMODE((dest / "a.txt").stat().st_mode) == 0o644


# --- the chunked fetch ------------------------------------------------------------------------


class Origin:
    """Serves a bundle file as the origin's agent does; drops the calls it is told to."""

    def __init__(self, path: Path, drop: set[int] | None = None, corrupt: bool = False):
        self.path, self.drop, self.corrupt = path, drop or set(), corrupt
        self.asked: list[int] = []

    async def call(self, msg: wire.Message) -> tuple[wire.Message | None, str]:
        assert isinstance(msg, wire.FetchBundle)
        self.asked.append(msg.offset)
        if len(self.asked) in self.drop:
            return None, "connection reset by peer"
        data, total = read_chunk(self.path, msg.offset, msg.length)
        if self.corrupt:
            data = bytes(b ^ 1 for b in data)
        return wire.BundleChunk(msg.bundle, msg.offset, data, total), ""


def _bundle(tmp_path: Path, size: int) -> tuple[Path, Want]:
    path = tmp_path / "origin.tar"
    path.write_bytes(os.urandom(size))
    return path, Want(sha256_file(path), size, "job1")


def test_a_dropped_connection_costs_one_chunk(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 10_000)
    origin = Origin(path, drop={3})
    dest = tmp_path / "cache" / f"{want.sha}.tar"
    got = asyncio.run(fetch(origin.call, want, tmp_path / "cache" / "p.part", dest,
                            chunk=3000, pause=0))
    assert dest.read_bytes() == path.read_bytes()
    # Four calls in flight; the third is dropped, so it and the one behind it are asked
    # again (what came after a gap is not kept).
    assert origin.asked == [0, 3000, 6000, 9000, 6000, 9000]
    assert (got.bytes, got.retries, got.resumed_at) == (10_000, 1, 0)
    assert not (tmp_path / "cache" / "p.part").exists()


def test_one_call_at_a_time_asks_each_chunk_once(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 10_000)
    origin = Origin(path, drop={3})
    got = asyncio.run(fetch(origin.call, want, tmp_path / "p.part", tmp_path / "b.tar",
                            chunk=3000, pause=0, depth=1))
    assert origin.asked == [0, 3000, 6000, 6000, 9000]
    assert got.retries == 1 and (tmp_path / "b.tar").read_bytes() == path.read_bytes()


class Slow(Origin):
    """Answers after a pause, at most ``short`` bytes a call; counts the calls in flight."""

    def __init__(self, path: Path, short: int = 0) -> None:
        super().__init__(path)
        self.short, self.now, self.most = short, 0, 0

    async def call(self, msg: wire.Message) -> tuple[wire.Message | None, str]:
        self.now += 1
        self.most = max(self.most, self.now)
        await asyncio.sleep(0.001)
        self.now -= 1
        reply, error = await super().call(msg)
        if self.short and isinstance(reply, wire.BundleChunk):
            reply = wire.BundleChunk(reply.bundle, reply.offset, reply.data[:self.short],
                                     reply.total)
        return reply, error


def test_several_calls_are_in_flight_and_a_short_chunk_moves_the_window(
        tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 20_000)
    slow = Slow(path)
    asyncio.run(fetch(slow.call, want, tmp_path / "p.part", tmp_path / "b.tar", chunk=2000,
                      depth=3))
    assert slow.most == 3 and slow.asked == list(range(0, 20_000, 2000))
    short = Slow(path, short=1500)  # an origin that serves less than asked
    got = asyncio.run(fetch(short.call, want, tmp_path / "p2.part", tmp_path / "b2.tar",
                            chunk=2000, depth=3))
    assert (tmp_path / "b2.tar").read_bytes() == path.read_bytes()
    assert got.retries == 0 and got.bytes == 20_000
    assert short.asked[:4] == [0, 2000, 4000, 1500]  # asked again from where it ended
    # ... and from then on in chunks of what the origin serves (its cap under a bulk_rate),
    # so the window is not thrown away again at every reply.
    assert short.asked[3:] == list(range(1500, 20_000, 1500))
    assert got.chunks == 1 + len(range(1500, 20_000, 1500))  # (replies taken)


def test_a_fetch_cut_short_resumes_from_what_came(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 10_000)
    partial, dest = tmp_path / "p.part", tmp_path / "b.tar"
    dead = Origin(path, drop=set(range(3, 100)))  # the origin goes away after two chunks
    with pytest.raises(FetchError, match=r"gave up after 2 retries in [0-9.]+ s at byte 6000"):
        asyncio.run(fetch(dead.call, want, partial, dest, chunk=3000, retries=2, pause=0))
    assert partial.stat().st_size == 6000 and not dest.exists()
    back = Origin(path)
    got = asyncio.run(fetch(back.call, want, partial, dest, chunk=3000, pause=0))
    assert back.asked == [6000, 9000]  # from the partial file's size, not from 0
    assert (got.bytes, got.resumed_at) == (4000, 6000)
    assert dest.read_bytes() == path.read_bytes()


def test_a_bundle_that_does_not_match_its_hash_is_thrown_away(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 5000)
    partial, dest = tmp_path / "p.part", tmp_path / "b.tar"
    with pytest.raises(FetchError, match="does not match its SHA-256"):
        asyncio.run(fetch(Origin(path, corrupt=True).call, want, partial, dest, pause=0))
    assert not partial.exists() and not dest.exists()


def test_a_refusal_or_a_stopped_job_ends_the_fetch_at_once(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 5000)

    async def refuse(msg: wire.Message) -> tuple[wire.Message | None, str]:
        return wire.Error("no job here carries it"), ""

    with pytest.raises(FetchError, match="refused: no job here"):
        asyncio.run(fetch(refuse, want, tmp_path / "p.part", tmp_path / "b.tar", pause=0))
    with pytest.raises(FetchError, match="job stopped"):
        asyncio.run(fetch(Origin(path).call, want, tmp_path / "p.part", tmp_path / "b.tar",
                          alive=lambda: False, pause=0))


def test_an_origin_out_of_reach_for_a_while_is_waited_for_within_the_patience(
        tmp_path: Path) -> None:
    """A radio shadow: far more failed tries in a row than ``retries``, and the fetch
    goes on while ``patience`` lasts, telling of each retry; a stopped job ends it."""
    path, want = _bundle(tmp_path, 10_000)
    shadow = Origin(path, drop=set(range(2, 30)))  # gone after one chunk, for 28 tries
    heard: list[tuple[int, str, float]] = []
    got = asyncio.run(fetch(shadow.call, want, tmp_path / "p.part", tmp_path / "b.tar",
                            chunk=3000, depth=1, retries=2, pause=0.0, patience=60.0,
                            retrying=lambda at, why, pause: heard.append((at, why, pause))))
    assert (tmp_path / "b.tar").read_bytes() == path.read_bytes()
    assert got.retries == 28 and len(heard) == 28
    assert heard[0] == (3000, "connection reset by peer", 0.0)
    # Without the patience the same origin fails the fetch after the retries...
    gone = Origin(path, drop=set(range(2, 30)))
    with pytest.raises(FetchError, match=r"gave up after 2 retries in [0-9.]+ s at byte 3000"):
        asyncio.run(fetch(gone.call, want, tmp_path / "q.part", tmp_path / "c.tar",
                          chunk=3000, depth=1, retries=2, pause=0.0))
    assert len(gone.asked) == 4
    # ... and a job stopped during a pause ends the fetch after it, not at the patience.
    live = [True]

    def stop(at: int, why: str, pause: float) -> None:
        live[0] = False

    with pytest.raises(FetchError, match="job stopped") as info:
        asyncio.run(fetch(Origin(path, drop=set(range(2, 30))).call, want,
                          tmp_path / "r.part", tmp_path / "d.tar", chunk=3000, depth=1,
                          pause=0.0, patience=3600.0, alive=lambda: live[0], retrying=stop))
    assert info.value.stopped and not info.value.refused


def test_the_pause_between_tries_grows_to_at_most_five_seconds(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 3000)
    pauses: list[float] = []

    async def no_sleep(seconds: float) -> None:  # (the pauses are only recorded)
        pauses.append(seconds)

    monkeypatch.setattr(bundlefetch.asyncio, "sleep", no_sleep)
    got = asyncio.run(fetch(Origin(path, drop=set(range(1, 10))).call, want,
                            tmp_path / "p.part", tmp_path / "b.tar", pause=0.2, depth=1,
                            patience=3600.0))
    assert got.retries == 9
    assert pauses == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]


def test_an_origin_holding_another_size_is_not_believed(tmp_path: Path) -> None:
    path, want = _bundle(tmp_path, 5000)
    lying = Want(want.sha, 6000)
    with pytest.raises(FetchError, match="holds 5000 bytes"):
        asyncio.run(fetch(Origin(path).call, lying, tmp_path / "p", tmp_path / "b", pause=0))


# --- the store --------------------------------------------------------------------------------


def _put(cache: BundleCache, name: str, size: int) -> str:
    sha = name * 64
    cache.path(sha).write_bytes(b"\0" * size)
    cache.add(sha, size)
    return sha


def test_the_store_evicts_the_least_recently_used_not_in_use(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "bundles", capacity=3000)
    cache.load()
    a, b, c = (_put(cache, x, 1000) for x in "abc")
    assert cache.evict(set()) == []  # fits
    assert cache.use(a)  # a is now the most recently used
    d = _put(cache, "d", 1000)
    assert cache.evict(set()) == [b]
    assert not cache.path(b).exists() and not cache.has(b)
    e = _put(cache, "e", 1000)
    assert cache.evict({c}) == [a]  # c is in use: the next oldest goes
    cache.pin(d)
    f = _put(cache, "f", 2500)
    assert cache.evict({f}) == [c, e]  # d pinned, f in use: over capacity, all else goes
    assert cache.has(d) and cache.has(f) and cache.total == 3500
    cache.unpin(d)
    assert cache.evict({f}) == [d]
    assert not cache.use(b)  # gone: a miss


def test_the_store_remembers_use_across_restarts(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "bundles", capacity=2000)
    cache.load()
    old, new = _put(cache, "a", 1000), _put(cache, "b", 1000)
    then = time.time() - 100
    os.utime(cache.path(new), (then, then))  # b last used long ago
    (tmp_path / "bundles" / ".pack-123.tmp").write_bytes(b"half")
    again = BundleCache(tmp_path / "bundles", capacity=1000)
    again.load()
    assert again.total == 2000 and again.has(old)
    assert again.evict(set()) == [new]
    assert not (tmp_path / "bundles" / ".pack-123.tmp").exists()
    with pytest.raises(ValueError):
        again.path("../../etc/passwd")


# --- settings ---------------------------------------------------------------------------------


def test_payload_settings_take_sizes_and_refuse_the_impossible(tmp_path: Path) -> None:
    from flexmesh.agent.config import ConfigError, load

    conf = tmp_path / "agent.toml"
    conf.write_text('[payload]\ncache_size = 2048\nmax_bundle = "512MiB"\nmax_files = 7\n')
    s = load(str(conf), {}, env={})
    assert (s.cache_bytes(), s.max_bundle_bytes(), s.payload_max_files) == (2 << 30,
                                                                            512 * MIB, 7)
    assert load(None, {}, env={}).cache_bytes() == 10 << 30  # the defaults
    assert load(None, {}, env={}).max_bundle_bytes() == 1 << 30
    for text, problem in (('cache_size = "1GiB"\nmax_bundle = "2GiB"', "at least max_bundle"),
                          ('max_bundle = "lots"', "invalid size"),
                          ("max_files = 0", "max_files must be at least 1"),
                          ('work_dir = "relative"', "absolute path")):
        conf.write_text(f"[payload]\n{text}\n")
        with pytest.raises(ConfigError, match=problem):
            load(str(conf), {}, env={})
