"""`flexmesh simulate`: the FGD paper's replay protocol over the openb traces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexmesh.agent import trace_replay
from flexmesh.agent.holdsim import MAX_BYTES, MIN_BYTES, HoldSim
from flexmesh.policies import DEFAULT_POLICY
from flexmesh.protocol.facts import MAX_HELD

DATA = Path(__file__).parents[1].parent / "shared" / "data" / "openb"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no trace data in {DATA}")
TRACES = sorted(DATA.glob("openb_pod_list_*.csv")) if DATA.is_dir() else []

NODES_CSV = "sn,cpu_milli,memory_mib,gpu,model\n"
PODS_CSV = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n"


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def small_nodes(tmp: Path, n: int = 60) -> Path:
    """The first ``n`` GPU nodes of the real node list (a small cluster, same shapes)."""
    lines = (DATA / "openb_node_list_gpu_node.csv").read_text().splitlines()
    return write(tmp, "nodes.csv", "\n".join(lines[: n + 1]) + "\n")


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert trace_replay.main([*argv, "-o", "json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


# -- the protocol on tiny hand-made inputs ----------------------------------------------------


def test_protocol_on_a_tiny_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = write(tmp_path, "n.csv", NODES_CSV + "a,8000,32768,2,T4\nb,8000,32768,1,V100\n")
    pods = write(
        tmp_path,
        "p.csv",
        PODS_CSV + "p0,1000,1024,1,500,\np1,1000,1024,1,1000,V100\np2,500,512,0,0,\n",
    )
    out = run_json(capsys, ["--trace", str(pods), "--nodes", str(nodes), "--seed", "1"])
    for key in (
        "policy",
        "seed",
        "tasks",
        "placed",
        "failed",
        "unallocated_gpu_pct_100",
        "unallocated_gpu_pct_130",
        "seconds",
    ):
        assert key in out
    assert out["policy"] == DEFAULT_POLICY and out["seed"] == 1
    assert out["capacity_gpu_milli"] == 3000
    assert out["placed"] + out["failed"] == out["tasks"]  # type: ignore[operator]
    # the tasks were inflated to at least 130% of 3000 milli
    assert out["tasks"] >= 3


def test_arrival_order_shuffles_and_inflates() -> None:
    tasks = [trace_replay.Task(f"t{i}", 0, 0, 1, 500) for i in range(10)]
    order = trace_replay.arrival_order(tasks, 4000, seed=7, inflate=1.3)
    assert sorted(t.name for t in order[:10]) == sorted(t.name for t in tasks)
    assert sum(t.gpu_request for t in order) >= 1.3 * 4000
    assert sum(t.gpu_request for t in order[:-1]) < 1.3 * 4000
    assert order == trace_replay.arrival_order(tasks, 4000, seed=7, inflate=1.3)
    assert order != trace_replay.arrival_order(tasks, 4000, seed=8, inflate=1.3)
    # CPU-only traces are not inflated (there is no GPU request to grow)
    assert len(trace_replay.arrival_order([trace_replay.Task("c", 1, 1, 0, 0)], 1000, 1, 1.3)) == 1


def test_unallocated_metric() -> None:
    events = [(99.0, 90.0), (99.6, 95.0), (100.4, 96.0), (100.6, 97.0)]
    assert trace_replay.unallocated_at(events, 100) == pytest.approx(100 - 95.5)
    assert trace_replay.unallocated_at(events, 130) is None
    # no event at the level itself: those within one percent of it stand in
    assert trace_replay.unallocated_at([(98.6, 90.0), (101.4, 92.0)], 100) == pytest.approx(9.0)


def test_no_sharing_rounds_fractions_up() -> None:
    t = trace_replay.Task("t", 1000, 10, 1, 300, ("T4",))
    assert t.request().compute_milli == 300
    r = t.request(sharing=False)
    assert r.compute_milli == 1000 and r.models == ("T4",) and r.host_memory_mib == 10
    cpu = trace_replay.Task("c", 1000, 10, 0, 0).request(sharing=False)
    assert cpu.count == 0 and cpu.compute_milli == 0


def test_sharing_places_more_than_no_sharing() -> None:
    nodes = [
        trace_replay.NodeSpec(f"n{i}", tuple(trace_replay.DeviceSpec(f"g{j}") for j in range(4)))
        for i in range(5)
    ]
    tasks = [trace_replay.Task(f"t{i}", 0, 0, 1, 250) for i in range(40)]
    shared = trace_replay.replay(nodes, tasks, "best-fit", 3, 1.3, sharing=True)
    alone = trace_replay.replay(nodes, tasks, "best-fit", 3, 1.3, sharing=False)
    assert shared["gpu_tasks_placed_100"] > alone["gpu_tasks_placed_100"]
    assert shared["unallocated_gpu_pct_100"] == pytest.approx(0.0)


def test_text_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = write(tmp_path, "n.csv", NODES_CSV + "a,8000,32768,2,T4\n")
    pods = write(tmp_path, "p.csv", PODS_CSV + "p0,1000,1024,1,500,\n")
    argv = ["--trace", str(pods), "--nodes", str(nodes), "--policy", "spread"]
    assert trace_replay.main(argv) == 0
    out = capsys.readouterr().out
    assert "unallocated GPU at 100% arrival" in out and "spread" in out


# -- malformed input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "text", "expect"),
    [
        ("nodes", NODES_CSV + "a,8000,32768,two,T4\n", ":2: column 'gpu' is not a number"),
        ("nodes", NODES_CSV + "a,8000,32768,2,T4\nb,1,1\n", ":3: fewer fields"),
        ("nodes", NODES_CSV + "a,8000,32768,2,T4,extra\n", ":2: more fields"),
        ("nodes", "sn,cpu_milli,gpu\na,1,1\n", ":1: header lacks column(s) memory_mib, model"),
        ("nodes", NODES_CSV + "a,-5,32768,2,T4\n", ":2: column 'cpu_milli' must be at least 0"),
        ("nodes", NODES_CSV + "a,1,1,2,T4\na,1,1,2,T4\n", ":3: node 'a' is listed twice"),
        ("nodes", "", ":1: empty file"),
        ("pods", PODS_CSV + "p0,1000,1024,1,1500,\n", ":2: column 'gpu_milli' must be between"),
        ("pods", PODS_CSV + "p0,1000,1024,1,0,\n", ":2: num_gpu is 1 but gpu_milli is 0"),
        ("pods", PODS_CSV + "p0,1000,,1,500,\n", ":2: column 'memory_mib' is empty"),
        ("pods", PODS_CSV + "p0,1.5,1024,1,500,\n", ":2: column 'cpu_milli' is not a whole"),
        ("pods", PODS_CSV, ": no tasks"),
    ],
)
def test_malformed_csv_names_file_line_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, text: str, expect: str
) -> None:
    good_nodes = write(tmp_path, "good_nodes.csv", NODES_CSV + "a,8000,32768,2,T4\n")
    good_pods = write(tmp_path, "good_pods.csv", PODS_CSV + "p0,1000,1024,1,500,\n")
    bad = write(tmp_path, f"bad_{which}.csv", text)
    nodes, pods = (bad, good_pods) if which == "nodes" else (good_nodes, bad)
    assert trace_replay.main(["--trace", str(pods), "--nodes", str(nodes)]) == 2
    err = capsys.readouterr().err
    assert str(bad) + expect in err, err
    assert "Traceback" not in err


def test_missing_file_and_bad_args(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "n.csv", NODES_CSV + "a,8000,32768,2,T4\n")
    assert trace_replay.main(["--trace", str(tmp_path / "nope.csv"), "--nodes", str(good)]) == 2
    assert "nope.csv: cannot read" in capsys.readouterr().err
    assert trace_replay.main(["--trace", str(good), "--nodes", str(good), "--policy", "zzz"]) == 2
    assert "unknown placement policy" in capsys.readouterr().err
    assert trace_replay.main(["--trace", str(good), "--nodes", str(good), "--inflate", "0"]) == 2
    assert trace_replay.main(["--nodes", str(good)]) == 2  # argparse: --trace is required
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"sn,cpu_milli\n\xff\xfe\n")
    assert trace_replay.main(["--trace", str(good), "--nodes", str(bad)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_module_entry_point_reports_errors_without_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.csv", NODES_CSV + "a,x,1,1,T4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "flexmesh.agent.trace_replay", "--trace", str(bad),
         "--nodes", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "bad.csv:2:" in proc.stderr and "Traceback" not in proc.stderr


# -- every real trace -------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem.replace("openb_pod_list_", ""))
def test_simulate_every_trace(
    trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the whole trace file, on a small slice of the real cluster (the protocol is the same;
    # the full-size runs are scripts/bench_placement's job)
    out = run_json(
        capsys, ["--trace", str(trace), "--nodes", str(small_nodes(tmp_path)), "--seed", "42"]
    )
    assert out["placed"] + out["failed"] == out["tasks"]  # type: ignore[operator]
    assert out["placed"] > 0
    for key in ("unallocated_gpu_pct_100", "unallocated_gpu_pct_130"):
        v = out[key]
        assert isinstance(v, float) and 0.0 <= v <= 100.0


@needs_data
def test_full_default_trace_beats_the_papers_fgd(capsys: pytest.CaptureFixture[str]) -> None:
    """One seed of the real protocol at full size: the default policy leaves less than the
    paper's FGD (4.77% unallocated at 100% arrival on the default trace)."""
    out = run_json(
        capsys,
        [
            "--trace",
            str(DATA / "openb_pod_list_default.csv"),
            "--nodes",
            str(DATA / "openb_node_list_gpu_node.csv"),
        ],
    )
    assert out["policy"] == DEFAULT_POLICY
    v = out["unallocated_gpu_pct_100"]
    assert isinstance(v, float) and v < 4.77


# -- working directories (the holding bonus) ----------------------------------------------


@needs_data
def test_workdirs_the_holding_bonus_saves_bytes_without_fragmenting_more() -> None:
    nodes = trace_replay.load_nodes(DATA / "openb_node_list_gpu_node.csv")[:60]
    tasks = trace_replay.load_tasks(DATA / "openb_pod_list_default.csv")[:400]
    off = trace_replay.replay(nodes, tasks, "fgd-plus", 5, workdirs=30, cache_bonus=0.0)
    on = trace_replay.replay(nodes, tasks, "fgd-plus", 5, workdirs=30)
    plain = trace_replay.replay(nodes, tasks, "fgd-plus", 5)
    assert "workdirs" not in plain  # without working directories the figures are as before
    assert off["unallocated_gpu_pct_100"] == plain["unallocated_gpu_pct_100"]
    assert on["workdir_bytes_saved_pct"] > off["workdir_bytes_saved_pct"] + 2
    assert on["unallocated_gpu_pct_100"] <= off["unallocated_gpu_pct_100"] + 0.2


def test_a_node_holds_its_last_workdirs_only() -> None:
    hold = HoldSim(100, 1)
    for wd in range(MAX_HELD + 1):
        hold.placed("n", wd)
    assert hold.saved(0) == {}  # the oldest left the node's digest
    assert hold.saved(MAX_HELD) == {"n": hold.sizes[MAX_HELD]}
    hold.placed("n", MAX_HELD)
    assert hold.saved_bytes == hold.sizes[MAX_HELD]
    assert all(MIN_BYTES <= s <= MAX_BYTES for s in hold.sizes)
    with pytest.raises(ValueError):
        HoldSim(0, 1)


def test_workdir_arguments_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "n.csv", NODES_CSV + "a,8000,32768,2,T4\n")
    pods = write(tmp_path, "p.csv", PODS_CSV + "t,1000,1024,1,500,\n")
    base = ["--trace", str(pods), "--nodes", str(good)]
    assert trace_replay.main([*base, "--workdirs", "-1"]) == 2
    assert "--workdirs" in capsys.readouterr().err
    assert trace_replay.main([*base, "--cache-bonus", "nan"]) == 2
    assert "--cache-bonus" in capsys.readouterr().err
    out = run_json(capsys, [*base, "--workdirs", "3"])
    assert out["workdirs"] == 3 and "workdir_bytes_saved_pct" in out
