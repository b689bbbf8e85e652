"""profiling/device_check.py end to end on CPU (tiny shapes, kernels in interpret mode), as CI runs it;
on a GPU the same script compiles the kernels and measures real shapes."""

import importlib.util
import json
import sys

from pallas_kernels._mgpu import interpret_params
from tests.conftest import REPO


def _module():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "profiling" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_device_check_runs_every_stage_on_cpu_and_writes_its_report(tmp_path, capsys):
    assert _module().main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["tiny"] and report["interpret"] and report["failed"] == [] and report["skipped"] == []
    kernels = report["kernels"]["result"]
    names = {"ragged_paged_attention", "tree_attention", "unisparse_block_scores", "unisparse_block_sparse_attention"}
    if interpret_params() is not None:  # jax >= 0.11 interprets the Mosaic GPU body on CPU
        names |= {f"{kernel}_mosaic_gpu" for kernel in
                  ("unisparse_block_sparse_attention", "ragged_paged_attention", "tree_attention")}
    assert {row["kernel"] for row in kernels} == names
    assert all(row["ok"] and row["max_abs_error"] < 0.03 for row in kernels)
    assert report["engine"]["result"]["ok"] and all(report["engine"]["result"]["equal"])
    assert report["bandwidth"]["result"] > 1e8
    speed = report["speed_tiny"]["result"]
    assert [row["what"] for row in speed] == ["decode b1", "decode b8", "prefill 64"]
    assert all(row["tok_s"] > 0 for row in speed) and all(0 < row["share_of_roofline"] < 1.5 for row in speed[:2])
    assert [row["tokens"] for row in report["unisparse"]["result"]] == [1024, 2048]
    out = capsys.readouterr().out
    assert "pallas == reference greedy: True" in out and "all checks passed" in out


def test_a_failing_check_fails_the_run():
    module = _module()
    good = {"result": [{"kernel": "k", "dtype": "float32", "max_abs_error": 0.0, "ok": True}]}
    assert module.failed({"kernels": good, "engine": {"result": {"ok": True}}}) == []
    bad = {"result": [{"kernel": "k", "dtype": "float32", "max_abs_error": 1.0, "ok": False}]}
    assert module.failed({"kernels": bad, "engine": {"result": {"ok": False}}, "unisparse": {"error": "x"}}) == \
        ["kernels", "engine", "unisparse"]


def test_stages_past_the_time_budget_are_skipped_and_reported(tmp_path, capsys):
    assert _module().main(["--tiny", "--stages", "speed,unisparse", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert report["skipped"] == ["bandwidth", "speed_tiny", "unisparse"] and report["failed"] == []
    assert "3 stages skipped" in capsys.readouterr().out
