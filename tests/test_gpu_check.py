"""scripts/gpu_check.py without a GPU: the report it makes from pytest's JUnit XML and
the tests' records, and its answers when it cannot run. (Building a bundle needs a package
index; `scripts/gpu-check --build DIR` is run by hand, see README.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu_real" name="test_a" time="12.34"/>
<testcase classname="tests.test_gpu_real" name="test_b" time="1.0">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_gpu_real" name="test_c" time="0.01">
  <skipped type="pytest.skip" message="nvidia-cuda-mps-control is not on PATH"/></testcase>
</testsuite></testsuites>"""


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_the_report_has_each_test_the_records_and_a_verdict(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = load()
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "records.jsonl").write_text(json.dumps({"record": "watchdog"}) + "\n")
    assert check.report(tmp_path, True, 99.94) == 1
    out = lines(capsys.readouterr().out)
    assert out[:3] == [
        {"test": "tests.test_gpu_real::test_a", "outcome": "passed", "duration_s": 12.3,
         "message": ""},
        {"test": "tests.test_gpu_real::test_b", "outcome": "failed", "duration_s": 1.0,
         "message": "assert 1 == 2"},
        {"test": "tests.test_gpu_real::test_c", "outcome": "skipped", "duration_s": 0.0,
         "message": "nvidia-cuda-mps-control is not on PATH"}]
    assert out[3] == {"measured": {"record": "watchdog"}}
    assert out[4] == {"summary": {"verdict": "failed", "passed": 1, "failed": 1, "error": 0,
                                  "skipped": 1, "total_s": 99.9}}


def test_all_skipped_is_exit_2_and_out_of_time_exit_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check = load()
    skipped = JUNIT.replace('<testcase classname="tests.test_gpu_real" name="test_a" '
                            'time="12.34"/>', "").replace("<failure", "<skipped")
    (tmp_path / "junit.xml").write_text(skipped.replace("</failure>", "</skipped>"))
    assert check.report(tmp_path, True, 1.0) == 2
    assert lines(capsys.readouterr().out)[-1]["summary"]["verdict"] == "nothing ran (no GPU?)"
    assert check.report(tmp_path / "none", False, 470.0) == 1
    assert lines(capsys.readouterr().out)[-1]["summary"]["verdict"] == "out of time"


def test_run_without_a_bundle_says_how_to_make_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert load().main(["--run", str(tmp_path)]) == 3
    (summary,) = lines(capsys.readouterr().out)
    assert "scripts/gpu-check --build DIR" in summary["summary"]["why"]


def test_run_without_the_bundles_python_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"python_version": "2.1", "commit": "x"}))
    assert load().main(["--run", str(tmp_path)]) == 3
    start, summary = lines(capsys.readouterr().out)
    assert start["python"] is None and "no Python 2.1" in summary["summary"]["why"]


def test_a_directory_that_is_not_a_bundle_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a gpu-check bundle"):
        load().main(["--build", str(tmp_path)])
    assert (tmp_path / "precious.txt").read_text() == "keep"
