"""The device check's record: parts gathered, a missing step said so, the issue's goals judged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from benchmarks.gpu import merge


def _level(callers: int, pairs_per_s: float, p50_ms: float) -> dict[str, float]:
    return {"callers": callers, "pairs_per_s": pairs_per_s, "p50_ms": p50_ms}


def test_merge_gathers_the_parts_and_judges_each_goal(tmp_path: Path):
    (tmp_path / "serve_minilm_l6.json").write_text(
        json.dumps({"levels": [_level(1, 7000.0, 14.0), _level(16, 12000.0, 130.0)]})
    )
    in_process = {
        "rows": [
            {"engine": "torch fp16 compiled", "precision": "fp16", "spearman": 0.9995, "top10_kept": 10},
            {"engine": "torch bf16 compiled", "precision": "bf16", "spearman": 0.9990, "top10_kept": 9},
            {"engine": "torch fp32 compiled", "error": "left out: the step's time budget"},
        ]
    }
    (tmp_path / "in_process.json").write_text(json.dumps(in_process))
    (tmp_path / "tests.txt").write_text("3 passed, 17 skipped")
    steps = tmp_path / "steps.jsonl"
    steps.write_text('{"step": "serve-xlm-r-base", "rc": 124, "timed_out": true}\n')
    parts = ["serve_minilm_l6.json", "serve_xlm_r_base.json", "in_process.json", "tests.txt"]

    record = merge([tmp_path / name for name in parts], steps, dry_run=False)

    assert record["serve_xlm_r_base"]["error"].startswith("no result: FileNotFoundError")
    assert record["tests"] == {"output_tail": "3 passed, 17 skipped"}
    assert record["steps"] == [{"step": "serve-xlm-r-base", "rc": 124, "timed_out": True}]
    goals = record["goals"]
    assert goals["minilm-l6, 16 callers, pairs/s"] == {"goal": ">= 15000", "measured": 12000.0, "met": False}
    assert goals["minilm-l6, 1 caller, p50 ms"] == {"goal": "<= 15", "measured": 14.0, "met": True}
    assert goals["xlm-r-base, 16 callers, pairs/s"]["met"] is None
    assert goals["torch fp16 compiled: Spearman, top 10"]["met"] is True
    assert goals["torch bf16 compiled: Spearman, top 10"]["met"] is False
    assert not any(goal.startswith("torch fp32") for goal in goals)


def test_a_dry_run_is_not_judged_against_the_goals(tmp_path: Path):
    (tmp_path / "serve_minilm_l6.json").write_text(json.dumps({"levels": [_level(1, 20.0, 400.0)]}))

    record = merge([tmp_path / "serve_minilm_l6.json"], None, dry_run=True)

    assert record["dry_run"] is True
    assert "goals" not in record


def test_the_check_stops_at_once_without_its_payload(tmp_path: Path):
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    script.parent.mkdir()
    shutil.copy(Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh", script)

    done = subprocess.run(
        ["bash", str(script), "--dry-run"],
        env={**os.environ, "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert "no payload" in done.stdout
    assert "benchmarks.gpu prepare" in done.stdout
    assert not (tmp_path / "out" / "gpu_check.json").exists()
