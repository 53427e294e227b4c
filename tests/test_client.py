"""``flexmesh.client`` against a real agent: submit, wait, logs (followed), cancel, jobs,
nodes, devices, and each way a request fails raised with the agent's own message."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import socket
import socketserver
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexmesh.agent.localmesh import LocalMesh
from flexmesh.client import (
    AgentUnavailable,
    BadRequest,
    Client,
    ClientError,
    Job,
    NotFound,
    ProtocolError,
    WaitTimeout,
)
from flexmesh.client.aio import AsyncClient

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """One agent with one simulated GPU, shared by this module's tests."""
    # Runs' directories where the user a job runs as may enter (pytest's are 0700).
    work = Path(tempfile.mkdtemp(prefix="flexmesh-work-", dir="/tmp"))
    work.chmod(0o711)
    with LocalMesh(tmp_path_factory.mktemp("mesh")) as mesh:
        conf = mesh.root / "a.toml"
        conf.write_text(f'[payload]\nwork_dir = "{work}"\n')
        mesh.start("a", sim="gpu:1x8GiB", extra=["--config", str(conf)])
        yield Client(mesh.agents["a"].socket)
    shutil.rmtree(work, ignore_errors=True)


def _output(job: Job, follow: bool = False) -> dict[str, bytes]:
    out = {"stdout": b"", "stderr": b""}
    for piece in job.logs(follow=follow):
        out[piece.stream] += piece.data
    return out


@pytest.mark.integration
def test_the_mesh_as_the_agent_sees_it(agent: Client) -> None:
    (node,) = agent.nodes()
    assert node["name"] == "a" and node["state"] == "alive" and node["coordinator"]
    (dev,) = agent.devices()
    assert (dev["node"], dev["id"], dev["kind"], dev["memory_mib"]) == ("a", "gpu0", "gpu", 8192)
    assert agent.status()["name"] == "a"


@pytest.mark.integration
def test_submit_wait_and_read_the_output(agent: Client) -> None:
    job = agent.submit(["sh", "-c", "echo out; echo err >&2; exit 3"], gpu=0.25,
                       memory="1GiB", env={"WHO": "client"})
    assert job.state in ("queued", "placed") and job.info["memory_mib"] == 1024
    ended = job.wait(timeout=60)
    assert ended["state"] == "failed" and ended["exit_code"] == 3 and job.state == "failed"
    assert _output(job) == {"stdout": b"out\n", "stderr": b"err\n"}
    assert _output(job, follow=True) == {"stdout": b"out\n", "stderr": b"err\n"}
    assert job.id in [j["id"] for j in agent.jobs()]
    assert agent.job(job.id[:8]).id == job.id  # a unique prefix, as the CLI takes

    ok = agent.submit(["sh", "-c", 'echo "$WHO"'], compute_milli=250, env={"WHO": "client"})
    assert ok.wait(timeout=60)["state"] == "succeeded"
    assert _output(ok)["stdout"] == b"client\n"


@pytest.mark.integration
def test_follow_a_running_job_and_cancel_it(agent: Client) -> None:
    job = agent.submit(["sh", "-c", "echo ready; exec sleep 300"], gpu=0.25)
    pieces = job.logs(follow=True)
    assert next(pieces) == ("stdout", b"ready\n")  # while the job still runs
    assert job.refresh()["state"] == "running"
    answer = Job(agent, job.id).cancel()  # another handle: by id alone
    assert answer["id"] == job.id and answer["result"]
    assert list(pieces) == []  # the stream ends with the job...
    assert job.state == "cancelled" and "cancelled" in job.info["reason"]  # ...and says how


@pytest.mark.integration
def test_a_wait_that_runs_out_leaves_the_job_alone(agent: Client) -> None:
    job = agent.submit(["true"], kind="npu", wait_for_capacity=True)  # no NPU in the mesh
    with pytest.raises(WaitTimeout) as caught:
        job.wait(timeout=0.5)
    assert caught.value.job == job.id and "still queued" in caught.value.message
    with pytest.raises(WaitTimeout):
        list(job.logs(follow=True, timeout=0.5))
    assert job.refresh()["state"] == "queued"
    job.cancel()
    assert job.wait(timeout=30)["state"] == "cancelled"


@pytest.mark.integration
def test_errors_carry_the_agents_message(agent: Client) -> None:
    with pytest.raises(NotFound) as nf:
        agent.job("nosuchjob")
    assert nf.value.status == 404 and nf.value.message == "no job nosuchjob was submitted here"
    with pytest.raises(NotFound, match="no job nosuchjob"):
        Job(agent, "nosuchjob").cancel()
    with pytest.raises(NotFound, match="no job nosuchjob"):
        list(Job(agent, "nosuchjob").logs())
    with pytest.raises(BadRequest) as bad:
        agent.submit(["true"], gpu=2)
    assert bad.value.status == 400
    assert bad.value.message == "gpu fraction 2 must be above 0 and at most 1 (one whole device)"
    with pytest.raises(BadRequest, match="command must be a non-empty list of strings"):
        agent.submit([])
    with pytest.raises(BadRequest, match="give either gpu"):
        agent.submit(["true"], gpu=0.5, compute_milli=500)
    with pytest.raises(BadRequest, match=r"memory: .*size") as unread:
        agent.submit(["true"], memory="lots")  # checked here: never sent
    assert unread.value.status is None


@pytest.mark.integration
def test_results_from_a_real_agent(agent: Client, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    job = agent.submit(["sh", "-c", 'mkdir "$FLEXMESH_OUTPUT/d" && echo 42 > '
                        '"$FLEXMESH_OUTPUT/d/answer.txt"'], gpu=0.25)
    ended = job.wait(timeout=60)
    assert ended["state"] == "succeeded", (ended, _output(job))
    dest = tmp_path / "out"
    assert job.results(dest) == [dest / "d" / "answer.txt"]
    assert (dest / "d" / "answer.txt").read_text() == "42\n"
    assert job.refresh()["results"]["files"] == [{"name": "d/answer.txt", "size": 3}]
    with pytest.raises(BadRequest, match="attempt must be a number from 0 to 0"):
        job.results(dest, attempt=1)
    from flexmesh.agent.cli import main

    monkeypatch.setenv("FLEXMESH_SOCKET", agent.socket)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert main(["results", job.id, str(blocked / "out")]) == 1  # (no traceback)
    assert capsys.readouterr().err.startswith(
        f"flexmesh: cannot write the results into {blocked / 'out'}: ")
    running = agent.submit(["sleep", "300"], gpu=0.25)
    with pytest.raises(ClientError, match="its results come when it ends") as early:
        running.results(tmp_path / "early")
    assert early.value.status == 409
    running.cancel()


def test_results_from_an_agent_without_them_say_so(results_agent: Client, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Results, "status", 404)
    monkeypatch.setattr(_Results, "content_type", "text/plain")
    monkeypatch.setattr(_Results, "archive", b"404: Not Found")
    with pytest.raises(NotFound) as nf:
        Job(results_agent, "j1").results(tmp_path / "out")
    assert nf.value.status == 404
    assert "does not serve results" in nf.value.message and "404: Not Found" in nf.value.message


@pytest.mark.integration
async def test_the_async_twin(agent: Client, tmp_path: Path) -> None:
    async with AsyncClient(agent.socket) as client:
        assert [n["name"] for n in await client.nodes()] == ["a"]
        assert [d["id"] for d in await client.devices()] == ["gpu0"]
        job = await client.submit(["sh", "-c", "echo ready; echo err >&2; exec sleep 300"],
                                  gpu=0.25)
        pieces = job.logs(follow=True)
        got = {await anext(pieces), await anext(pieces)}
        assert got == {("stdout", b"ready\n"), ("stderr", b"err\n")}
        assert (await job.refresh())["state"] == "running"
        with pytest.raises(WaitTimeout):
            await job.wait(timeout=0.2)
        assert (await job.cancel())["id"] == job.id
        assert [p async for p in pieces] == [] and job.state == "cancelled"
        assert (await job.wait(timeout=30))["state"] == "cancelled"
        assert job.id in [j["id"] for j in await client.jobs()]
        assert [p async for p in job.logs()] == [("stdout", b"ready\n"), ("stderr", b"err\n")]

        with pytest.raises(NotFound, match="no job nosuchjob was submitted here"):
            await client.job("nosuchjob")
        with pytest.raises(BadRequest, match="gpu fraction 2 must be above 0"):
            await client.submit(["true"], gpu=2)
        assert await job.results(tmp_path / "out") == []  # (cancelled: it wrote none)
    async with AsyncClient(tmp_path / "none.sock") as gone:
        with pytest.raises(AgentUnavailable, match="no flexmesh agent at"):
            await gone.status()


def test_no_agent_at_the_socket(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(AgentUnavailable) as gone:
        Client(missing).nodes()
    assert gone.value.socket == missing and isinstance(gone.value.cause, FileNotFoundError)
    assert f"no flexmesh agent at {missing}" in gone.value.message
    assert gone.value.status is None

    stale = tmp_path / "stale.sock"  # a socket left by an agent that is gone
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(AgentUnavailable) as refused:
        Client(stale).submit(["true"])
    assert isinstance(refused.value.cause, ConnectionRefusedError)


@pytest.mark.integration
def test_the_cli_says_the_clients_errors_as_before(agent: Client, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's words and exit codes for each error, through the client."""
    from flexmesh.agent.cli import main

    missing = str(tmp_path / "none.sock")
    assert main(["nodes", "--socket", missing]) == 3
    assert capsys.readouterr().err == (f"flexmesh: no flexmesh agent at {missing} (is it "
                                       "running? set --socket or FLEXMESH_SOCKET)\n")
    assert main(["jobs", "--socket", missing, "-o", "json"]) == 3
    assert capsys.readouterr().out.startswith('{"error": "no flexmesh agent at')
    monkeypatch.setenv("FLEXMESH_SOCKET", agent.socket)
    for argv, code, err in [
            (["show", "nosuchjob"], 1, "no job nosuchjob was submitted here"),
            (["logs", "nosuchjob"], 1, "no job nosuchjob was submitted here"),
            (["cancel", "nosuchjob"], 1, "no job nosuchjob was submitted here"),
            (["submit", "--priority", "5000", "--", "true"], 2,
             "priority must be an integer between -1000 and 1000")]:
        assert main(argv) == code, argv
        assert capsys.readouterr().err == f"flexmesh: {err}\n"
    assert main(["nodes", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == agent.nodes()


def test_the_socket_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXMESH_SOCKET", "/tmp/elsewhere.sock")
    assert Client().socket == "/tmp/elsewhere.sock"
    assert Client("/tmp/given.sock").socket == "/tmp/given.sock"
    monkeypatch.delenv("FLEXMESH_SOCKET")
    assert Client().socket == "/run/flexmesh/agent.sock"


# --- results: an agent that serves them, as a tar archive --------------------------------


class _Results(http.server.BaseHTTPRequestHandler):
    archive = b""
    content_type = "application/x-tar"
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.archive)))
        self.end_headers()
        self.wfile.write(self.archive)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def results_agent(tmp_path: Path) -> Iterator[Client]:
    path = str(tmp_path / "results.sock")
    server = socketserver.UnixStreamServer(path, _Results)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(path, timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def _tar(*members: tuple[str, bytes | None, str]) -> bytes:
    """A tar of (name, data, link target): a file when data is given, else a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_results_are_unpacked_into_dest(results_agent: Client, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Results, "archive", _tar(("model.bin", b"weights", ""),
                                                  ("logs/loss.csv", b"1,0.5\n", "")))
    dest = tmp_path / "out"
    files = Job(results_agent, "j1").results(dest)
    assert files == [dest / "logs/loss.csv", dest / "model.bin"]
    assert (dest / "model.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in dest.iterdir()) == ["logs", "model.bin"]  # no spool left


@pytest.mark.parametrize("member", [("../escaped", b"x", ""), ("/abs", b"x", ""),
                                    ("link", None, "/etc/passwd")])
def test_hostile_results_are_refused(results_agent: Client, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     member: tuple[str, bytes | None, str]) -> None:
    monkeypatch.setattr(_Results, "archive", _tar(member))
    dest = tmp_path / "out"
    with pytest.raises(ProtocolError, match="refused"):
        Job(results_agent, "j1").results(dest)
    assert not (tmp_path / "escaped").exists() and list(dest.iterdir()) == []


def test_results_that_are_not_an_archive(results_agent: Client, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Results, "content_type", "application/json")
    with pytest.raises(ProtocolError, match="not a tar archive"):
        Job(results_agent, "j1").results(tmp_path / "out")
    monkeypatch.setattr(_Results, "content_type", "application/x-tar")
    monkeypatch.setattr(_Results, "archive", b"not a tar at all" * 100)
    with pytest.raises(ClientError, match="cannot be unpacked"):
        Job(results_agent, "j1").results(tmp_path / "out")
