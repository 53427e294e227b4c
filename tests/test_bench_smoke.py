"""Each benchmark script, run at its smallest size so that it cannot rot: it runs, prints
JSON lines, and the figures it prints are of the expected shape. (The real sizes are in the
scripts' defaults; see their --help.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_smoke_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_bench_membership_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_membership")
    rc = bench.main(["--nodes", "12", "--loss", "0,0.2", "--updates", "1", "--joins", "1",
                     "--crashes", "1", "--settle", "5", "--steady", "2", "--fd-nodes", "8",
                     "--fd-loss", "0.1", "--stall-loss", "0.1", "--fd-duration", "70"])
    assert rc == 0
    out = lines(capsys.readouterr().out)
    kinds = [x["bench"] for x in out]
    assert kinds.count("membership-dissemination") == 4  # facts and join, at two losses
    for x in out:
        if x["bench"] == "membership-dissemination":
            assert x["reached_9999_in_all_runs"], x
            assert 0 < x["t9999_s_max"] < 10, x
            assert x["bytes_per_s_per_node"] > 0
    crash = next(x for x in out if x["bench"] == "membership-crash")
    assert crash["crashes_not_dead_everywhere"] == 0
    assert crash["suspicion_min_s"] <= crash["detect_s_median"] < crash["suspicion_max_s"] + 5
    fd = [x for x in out if x["bench"] == "membership-false-dead"]
    assert [x["stall"] is not None for x in fd] == [False, True]
    for x in fd:
        assert x["sim_seconds"] == 70.0 and x["node_hours"] > 0
        assert x["false_dead_events"] >= 0 and x["bytes_per_s_per_node"] > 0
    assert out[-1]["bench"] == "membership-total"


@pytest.mark.integration
def test_bench_failover_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_failover")
    rc = bench.main(["--runs", "1", "--gpu-nodes", "2", "--profile", "local", "--pause",
                     "0.2", "--timeout", "60"])
    assert rc == 0
    out = lines(capsys.readouterr().out)
    run, summary = out[0], out[-1]
    assert run["bench"] == "failover-run" and run["killed"] == "g0"
    assert run["placed_by"] == "g1", run
    assert 0 < run["detect_s"] <= run["placed_s"], run
    assert summary["bench"] == "failover" and summary["placed_runs"] == 1


@pytest.mark.integration
def test_bench_kinship_flexmesh_side_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_kinship")
    rc = bench.main(["--systems", "flexmesh", "--phases", "clean", "--nodes", "3",
                     "--crashes", "1", "--profile", "local", "--crash-timeout", "60"])
    assert rc == 0
    out = lines(capsys.readouterr().out)
    crash = next(x for x in out if x["bench"] == "real-crash")
    assert crash["system"] == "flexmesh" and crash["crashes_not_dead_everywhere"] == 0
    assert crash["observations"] == 2 and 0 < crash["detect_s_median"] < 30
    assert crash["detect_s_median_polled"] is not None
    assert out[-1]["bench"] == "kinship-ratio"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_bench_kinship_drop_shim_builds(tmp_path: Path) -> None:
    bench = load("bench_kinship")
    lib = bench.build_shim(tmp_path)
    assert lib is not None and lib.exists()


def test_bench_invariants_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_invariants")
    assert bench.main(["--seeds", "4", "--first", "9000", "--jobs", "1"]) == 0
    (summary,) = lines(capsys.readouterr().out)
    assert summary["bench"] == "invariants" and summary["seeds"] == 4
    assert summary["failed"] == 0 and summary["jobs"] > 0, summary


@pytest.mark.integration
def test_bench_tcp_flood_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_tcp_flood")
    rc = bench.main(["--connections", "5", "--send", "131072", "--hold", "5", "--settle",
                     "0.2"])
    assert rc == 0
    (out,) = lines(capsys.readouterr().out)
    assert out["bench"] == "tcp-flood" and out["connections"] == 5
    assert out["refused"] == 5, out  # each announced 8 MiB without a Hello: closed unread
    assert out["counters"]["frames_dropped_first_too_large"] == 5, out
    assert 0 < out["rss_before_mib"] <= out["rss_peak_mib"]


def test_bench_fuzz_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_fuzz")
    assert bench.main(["--examples", "5"]) == 0
    (summary,) = lines(capsys.readouterr().out)
    assert summary["bench"] == "fuzz" and summary["failed"] == 0, summary
    assert summary["examples"] >= 1 and summary["inputs"] >= summary["examples"]

@pytest.mark.integration
def test_bench_fleet_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from flexmesh.agent.fleetlab import available

    why = available()
    if why is not None:
        pytest.skip(why)
    bench = load("bench_fleet")
    rc = bench.main(["--agents", "3", "--loss", "10", "--rate", "2", "--profile", "local",
                     "--duration", "4", "--job-every", "2", "--job-seconds", "0", "--poll",
                     "0.5", "--drain", "60", "--converge-timeout", "60", "--crashes", "1"])
    assert rc == 0
    (x,) = lines(capsys.readouterr().out)
    assert x["bench"] == "fleet" and x["agents"] == 3 and x["loss_pct"] == 10
    assert x["convergence_s"] > 0 and x["coordinators_seen"] == ["g0"]
    assert x["false_dead"] >= 0 and x["jobs_submitted"] >= 1
    assert x["jobs_completed"] == x["jobs_output_ok"] == x["jobs_submitted"], x
    assert x["crash_victims"] == ["g0"] and x["crash_undetected"] == 0, x  # the coordinator
    assert len(x["crash_detect_s"]) == 1 and x["crash_detect_s"][0] > 0, x


def test_bench_vivaldi_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_vivaldi")
    assert bench.main(["--nodes", "20", "--clusters", "2", "--rounds", "50"]) == 0
    (summary,) = lines(capsys.readouterr().out)
    assert summary["bench"] == "vivaldi" and summary["nodes"] == 20
    assert summary["median_relative_error"] >= 0 and 0 <= summary["nearest_in_own_cluster"] <= 1


@pytest.mark.integration
def test_bench_chaos_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_chaos")
    rc = bench.main(["--agents", "2", "--jobs", "4", "--kill-every", "1", "--down", "1",
                     "--job-seconds", "3", "--drain", "90"])
    assert rc == 0
    (x,) = lines(capsys.readouterr().out)
    assert x["bench"] == "chaos" and x["agents"] == 2 and x["jobs"] == 4 and x["kills"] >= 1
    ended = sum(x[s] for s in ("succeeded", "failed", "cancelled", "preempted", "lost"))
    assert ended + x["missing"] == 4 and x["missing"] == 0, x
    # Every job ran (its markers say so) and nothing ran twice at once or beyond capacity.
    assert x["runs_completed"] >= 4 and x["succeeded_not_run"] == 0, x
    assert x["jobs_ran_concurrently"] == [] and x["jobs_completed_twice"] == 0, x
    assert 0 < x["max_lease_ratio"] <= 1 and x["max_concurrent_runs"] <= x["slots"] == 4, x


@pytest.mark.integration
def test_bench_narrow_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from flexmesh.agent.fleetlab import available

    why = available()
    if why is not None:
        pytest.skip(why)
    bench = load("bench_narrow")
    rc = bench.main(["--profile", "local", "--bundle-mib", "1", "--output-mib", "1",
                     "--idle", "2", "--transfer-timeout", "120"])
    assert rc == 0
    (x,) = lines(capsys.readouterr().out)
    assert x["bench"] == "narrow" and x["rate_mbit"] == 2.0
    for run in ("uncapped", "capped"):
        assert x[run]["job_state"] in ("running", "succeeded"), x
        assert x[run]["idle"]["udp"]["n"] > 0 and x[run]["transfer_mbit_s"] > 0
    assert all(x[r]["output_arrived"] for r in ("uncapped", "capped", "uncompressed"))
    assert x["output_wire_ratio"] < 0.5  # text output compresses


@pytest.mark.integration
def test_bench_payload_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_payload")
    assert bench.main(["--size-mib", "4", "--files", "2", "--plain", "python",
                       "--drain-mib", "64", "--rounds", "2"]) == 0
    (x,) = lines(capsys.readouterr().out)
    assert x["bench"] == "payload" and x["size_mib"] == 4 and x["plain_method"] == "python"
    assert x["bundle_bytes"] >= 4 * 1024 * 1024 and x["plain_bytes"] >= 4 * 1024 * 1024
    assert x["fetch_s"] > 0 and x["fetch_mib_s"] > 0 and x["plain_mib_s"] > 0, x
    assert x["ratio"] == pytest.approx(x["fetch_mib_s"] / x["plain_mib_s"], rel=0.01)
    # each round a new bundle, fetched in one stream: 4 MiB and the tar headers, 5 chunks
    assert x["rounds"] == 2 and x["fetch_chunks"] == 10 and x["fetch_streams"] == 2, x
    assert len(x["fetch_mib_s_runs"]) == len(x["ratio_runs"]) == 2
    assert sorted(x["fetch_mib_s_runs"])[0] <= x["fetch_mib_s"] <= max(x["fetch_mib_s_runs"])
    assert x["unpack_s"] >= 0
    assert x["plain_cpu_ms_per_mib"] > 0 and x["owner_cpu_ms_per_mib"] >= 0
    assert x["origin_cpu_ms_per_mib"] >= 0
    assert x["origin_rss_before_mib"] > 0 and x["owner_rss_before_mib"] > 0
    assert x["rss_samples"] > 0 and "owner_rss_increase_mib" in x
    assert x["baseline_submit_to_start_s"] > 0 and x["first_submit_to_start_s"] > 0, x
    assert x["cache_hit_fetched_bytes"] == 0 and x["cache_hits"] == 1, x
    assert x["cache_hit_submit_to_start_s"] > 0
    assert len(x["plain_s_runs"]) == len(x["plain_undrained_s_runs"]) == 2
    assert all(0 < mib <= 64 for mib in [*x["fetch_drained_mib"], *x["plain_drained_mib"]])
    assert 0 < x["ratio_best_plain"] <= x["ratio"]
    assert set(x["page_write_ms_per_mib"]) == {"fresh", "recycled"}
