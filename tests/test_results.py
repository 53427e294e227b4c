"""Results: packing a hostile output directory (cut at the limits, nothing followed out of
the tree), the node's decisions (the owner's answer carries them, the origin fetches them
per attempt, the owner keeps them until taken), and a fetch of them resumed."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import tarfile
from pathlib import Path

import pytest

from flexmesh.agent.bundle import Reader
from flexmesh.agent.bundlefetch import FetchError, Want, fetch, read_chunk
from flexmesh.agent.models import JobRecord
from flexmesh.agent.node import Call, CollectResults, Node, NodeConfig, PersistRun, results
from flexmesh.agent.resultpack import list_results, pack_results
from flexmesh.protocol import wire

MIB = 1 << 20
SHA = "ab" * 32


# --- packing ----------------------------------------------------------------------------


def _tree(root: Path) -> Path:
    out = root / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("alpha\n")
    (out / "sub" / "b.bin").write_bytes(b"b" * 5000)
    (out / "in-tree").symlink_to("a.txt")
    (out / "escape").symlink_to("/etc/passwd")
    (out / "up").symlink_to("../../x")
    os.mkfifo(out / "fifo")
    return out


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar}


def test_a_hostile_output_directory_packs_what_is_safe(tmp_path: Path) -> None:
    packed = pack_results(_tree(tmp_path), tmp_path / "store", Reader(), MIB, 100)
    archive = tmp_path / "store" / f"{packed.sha256}.tar"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == packed.sha256
    assert archive.stat().st_size == packed.size <= MIB
    members = _members(archive)
    assert sorted(members) == ["a.txt", "in-tree", "sub", "sub/b.bin"]
    assert members["in-tree"].issym() and members["in-tree"].linkname == "a.txt"
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())
    assert packed.skipped == 3  # the two links out and the fifo
    assert packed.note == ("3 entries skipped (links out of the directory, devices, fifos, "
                           "sockets or files the job's user may not read)")
    assert list_results(archive) == [{"name": "a.txt", "size": 6},
                                     {"name": "sub/b.bin", "size": 5000}]
    again = pack_results(_tree(tmp_path / "again"), tmp_path / "store", Reader(), MIB, 100)
    assert again.sha256 == packed.sha256  # deterministic


def test_results_beyond_the_limits_are_cut_and_the_note_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "1-small").write_bytes(b"s" * 100)
    (out / "2-huge").write_bytes(b"h" * (2 * MIB))
    (out / "3-small").write_bytes(b"t" * 200)
    packed = pack_results(out, tmp_path / "store", Reader(), MIB, 100)
    assert packed.size <= MIB
    assert sorted(_members(tmp_path / "store" / f"{packed.sha256}.tar")) == ["1-small",
                                                                            "3-small"]
    assert packed.note.startswith(f"results cut at 300 of {300 + 2 * MIB} bytes")
    # entries, too: at most max_files
    many = pack_results(out, tmp_path / "store", Reader(), 8 * MIB, 2)
    assert many.files == 2 and many.left_out == 1 and "results cut" in many.note


def test_a_long_name_still_fits_its_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    deep = out / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    for i in range(30):
        (deep / f"{'f' * 150}{i:03d}").write_bytes(b"z" * 1000)
    packed = pack_results(out, tmp_path / "store", Reader(), MIB // 16, 1000)
    assert packed.size <= MIB // 16 and packed.left_out > 0


def test_non_ascii_names_are_counted_with_their_pax_headers(tmp_path: Path) -> None:
    """A short name that is not ASCII gets a PAX header too: counted, the archive stays
    within the limit (else the origin, with the same limit, would refuse all of it)."""
    out = tmp_path / "out"
    (out / "données").mkdir(parents=True)
    for i in range(200):
        (out / "données" / f"résultat-{i:03d}.txt").write_bytes(b"r" * 700)
    limit = 100 * 1024
    packed = pack_results(out, tmp_path / "store", Reader(), limit, 1000)
    assert packed.left_out > 0 and "results cut" in packed.note
    assert (tmp_path / "store" / f"{packed.sha256}.tar").stat().st_size == packed.size
    assert packed.size <= limit


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files of other users")
def test_a_file_the_job_user_may_not_read_is_not_packed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("ok")
    os.chown(out / "mine", 4242, 4242)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    os.link(secret, out / "hardlink")  # as a job could, where protected_hardlinks is off
    packed = pack_results(out, tmp_path / "store", Reader(4242, frozenset({4242})), MIB, 10)
    assert sorted(_members(tmp_path / "store" / f"{packed.sha256}.tar")) == ["mine"]
    assert packed.skipped == 1


def test_a_missing_output_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        pack_results(tmp_path / "nope", tmp_path / "store", Reader(), MIB, 10)
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(OSError):  # the directory itself is not followed through a link
        pack_results(tmp_path / "link", tmp_path / "store", Reader(), MIB, 10)


# --- the node's decisions -----------------------------------------------------------------


def _origin_following() -> tuple[Node, Call]:
    node = Node(NodeConfig("desk", "127.0.0.1:7946"), random.Random(1), 0.0)
    job = JobRecord(id="j1", origin="desk", command=["true"], compute_milli=500,
                    memory_mib=0, state="running", node="owner", devices=("gpu0",),
                    lease_id="owner/7", token=7, term=1, attempts=2)
    node.membership.handle_alive(wire.Alive("owner", "127.0.0.1:7947", 0), 0.0)
    node.recover([job], [], [], lambda j: False, 0.0)
    (sync,) = [e for e in node.drain() if isinstance(e, Call) and isinstance(e.msg, wire.JobSync)]
    return node, sync


def _end(state: str, sha: str = SHA, size: int = 10_240, note: str = "") -> wire.JobSyncReply:
    return wire.JobSyncReply(state, "why", 0, b"", b"", True, sha, size, note)


def test_the_origin_fetches_the_results_the_ending_answer_names() -> None:
    node, sync = _origin_following()
    node.call_result(sync.call_id, _end("succeeded", note="results cut at 1 of 2 bytes"),
                     "", 1.0)
    job = node.origin.jobs["j1"]
    assert job.state == "succeeded"
    assert (job.results, job.results_size, job.results_state, job.results_attempt) == (
        SHA, 10_240, "fetching", 2)
    assert job.results_note == "results cut at 1 of 2 bytes"
    assert [e for e in node.drain() if isinstance(e, CollectResults)] == [
        CollectResults("j1", 2, "owner", SHA, 10_240)]
    assert results.pending(node.origin) == [CollectResults("j1", 2, "owner", SHA, 10_240)]
    job.node = ""  # requeued (a preempted run's results): a restart still asks their owner
    assert results.pending(node.origin) == [CollectResults("j1", 2, "owner", SHA, 10_240)]
    job.node = "owner"
    results.collected(node, "j1", 1, SHA, "")  # another attempt's: not this one's
    assert job.results_state == "fetching"
    results.collected(node, "j1", 2, SHA, "")
    assert job.results_state == "here" and results.pending(node.origin) == []


def test_a_preempted_jobs_results_keep_their_attempt_when_it_is_requeued() -> None:
    node, sync = _origin_following()
    node.call_result(sync.call_id, _end("preempted"), "", 1.0)
    job = node.origin.jobs["j1"]
    assert job.state == "queued" and job.attempts == 3  # requeued
    (collect,) = [e for e in node.drain() if isinstance(e, CollectResults)]
    assert collect.attempt == 2 and job.results_attempt == 2
    results.collected(node, "j1", 2, SHA, "owner refused")
    assert job.results_state == "failed" and job.results_note == "owner refused"


def test_an_answer_naming_no_archive_or_a_bad_one_fetches_nothing() -> None:
    node, sync = _origin_following()
    node.call_result(sync.call_id, _end("failed", sha="../../etc/passwd"), "", 1.0)
    job = node.origin.jobs["j1"]
    assert job.results_state == "failed" and "not an archive's SHA-256" in job.results_note
    assert not [e for e in node.drain() if isinstance(e, CollectResults)]
    assert node.counters["results_invalid"] == 1
    node2, sync2 = _origin_following()
    node2.call_result(sync2.call_id, _end("lost", sha="", size=0), "", 1.0)
    assert node2.origin.jobs["j1"].results_state == ""
    assert not [e for e in node2.drain() if isinstance(e, CollectResults)]


def _owner_with_run() -> Node:
    from tests.test_node import gpu, lease, owner

    node = owner(1)
    reply = lease(node, "j1", gpu(0).id, compute=1000)
    assert isinstance(reply, wire.LeaseReply)
    start = wire.StartJob("j1", reply.lease_id, reply.token, "origin", ["true"], {}, 1000, 1024)
    assert isinstance(node.handle_request(start, 2.0), wire.Ok)
    node.job_started("j1", 4242, None, 2.5)
    node.drain()
    return node


def test_the_owner_answers_with_its_results_and_keeps_them_until_taken() -> None:
    node = _owner_with_run()
    lease_id = node.owner.runs["j1"].lease_id
    sync = wire.JobSync("j1", 0, 0, 0)
    running = node.sync_reply(sync, b"", b"", 1024, 3.0)
    assert isinstance(running, wire.JobSyncReply) and running.results == ""
    assert results.packed(node, "j1", lease_id, SHA, 4096, "")
    assert any(isinstance(e, PersistRun) for e in node.drain())
    assert not results.packed(node, "j1", "other/1", SHA, 1, "")  # not that run
    node.job_exited("j1", 0, "exited", 4.0, state=None)
    ended = node.sync_reply(sync, b"", b"", 1024, 4.0)
    assert isinstance(ended, wire.JobSyncReply) and ended.complete
    assert (ended.results, ended.results_size) == (SHA, 4096)
    assert results.held(node, "j1") and results.wanted(node, SHA)
    assert results.served(node, wire.FetchResults("j1", SHA, 0, 10))
    assert not results.served(node, wire.FetchResults("j2", SHA, 0, 10))
    refused = node.handle_request(wire.ResultsTaken("j1", "cd" * 32), 5.0)
    assert isinstance(refused, wire.Error)
    assert isinstance(node.handle_request(wire.ResultsTaken("j1", SHA), 5.0), wire.Ok)
    assert not results.held(node, "j1") and not results.wanted(node, SHA)
    assert not results.served(node, wire.FetchResults("j1", SHA, 0, 10))


def test_an_earlier_runs_results_outlive_a_new_run_of_the_job_here() -> None:
    """A run preempted here, its job placed here again before its origin fetched the
    results: the new run's record replaces the earlier one's, but the archive is still
    served and kept until the origin takes it."""
    from tests.test_node import gpu, lease

    node = _owner_with_run()
    first = node.owner.runs["j1"]
    assert results.packed(node, "j1", first.lease_id, SHA, 4096, "")
    node.job_exited("j1", None, "preempted", 4.0, state="preempted")
    node.drain()
    reply = lease(node, "j1", gpu(0).id, compute=1000)
    assert isinstance(reply, wire.LeaseReply)
    start = wire.StartJob("j1", reply.lease_id, reply.token, "origin", ["true"], {}, 1000, 1024)
    assert isinstance(node.handle_request(start, 5.0), wire.Ok)
    second = node.owner.runs["j1"]
    assert second is not first and second.results == "" and second.earlier_results == [SHA]
    assert results.served(node, wire.FetchResults("j1", SHA, 0, 10))
    assert results.wanted(node, SHA) and results.held(node, "j1")
    assert isinstance(node.handle_request(wire.ResultsTaken("j1", SHA), 6.0), wire.Ok)
    assert node.owner.runs["j1"].earlier_results == []
    assert not results.served(node, wire.FetchResults("j1", SHA, 0, 10))
    assert not results.wanted(node, SHA)


def test_a_job_whose_owner_was_lost_has_none_and_says_why() -> None:
    from flexmesh.agent.apiresults import results_view
    from flexmesh.protocol.membership import DEAD

    node, _sync = _origin_following()
    job = node.origin.jobs["j1"]
    job.requeue = False
    assert results_view(job)["state"] == "pending"
    node.origin.follow.member("owner", DEAD, 1.0)
    node.origin.follow.tick(1.0 + node.config.owner_dead_grace)
    assert job.state == "lost"
    view = results_view(job)
    assert view["state"] == "none" and view["note"].startswith("owner owner was out of reach")


# --- fetching them ------------------------------------------------------------------------


def test_a_fetch_of_results_resumes_and_checks_the_hash(tmp_path: Path) -> None:
    data = os.urandom(3 * 4096 + 17)
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "owner.tar"
    src.write_bytes(data)
    asked: list[wire.Message] = []
    calls = {"n": 0}

    async def call(msg: wire.Message) -> tuple[wire.Message | None, str]:
        asked.append(msg)
        calls["n"] += 1
        if calls["n"] == 2:
            return None, "connection reset"  # one call lost: asked again
        assert isinstance(msg, wire.FetchResults)
        chunk, total = read_chunk(src, msg.offset, msg.length)
        return wire.BundleChunk(msg.results, msg.offset, chunk, total), ""

    partial, dest = tmp_path / "1.tar.part", tmp_path / "1.tar"
    partial.write_bytes(data[:4096])  # from an origin that stopped half-way
    want = Want(sha, len(data), "j1", peer="owner a")
    got = asyncio.run(fetch(call, want, partial, dest, chunk=4096, pause=0.0,
                            ask=lambda off, n: wire.FetchResults("j1", sha, off, n)))
    assert dest.read_bytes() == data and not partial.exists()
    assert got.resumed_at == 4096 and got.retries == 1
    assert isinstance(asked[0], wire.FetchResults) and asked[0].offset == 4096

    async def refuse(msg: wire.Message) -> tuple[wire.Message | None, str]:
        return wire.Error("no run of j1 here has results"), ""

    with pytest.raises(FetchError, match="the owner a refused") as exc:
        asyncio.run(fetch(refuse, want, tmp_path / "2.part", tmp_path / "2.tar",
                          ask=lambda off, n: wire.FetchResults("j1", sha, off, n)))
    assert exc.value.refused


def test_the_client_unpacks_what_the_owner_packed(tmp_path: Path) -> None:
    from flexmesh.client.common import unpack_results

    packed = pack_results(_tree(tmp_path), tmp_path / "store", Reader(), MIB, 100)
    archive = (tmp_path / "store" / f"{packed.sha256}.tar").read_bytes()
    files = unpack_results(io.BytesIO(archive), tmp_path / "dest", MIB, 100)
    assert files == [tmp_path / "dest" / "a.txt", tmp_path / "dest" / "sub" / "b.bin"]
    assert (tmp_path / "dest" / "in-tree").readlink() == Path("a.txt")
