"""The GPU acceptance script (`make gpu-check`) runs end to end on the CPU in its smoke mode, so it is ready when
a GPU is: full and LoRA variants, two iterations each, TRL's DPOTrainer beside them, and its JSON summary."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_run_reports_every_variant(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=REPO, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "TRL DPOTrainer on iteration 2's pairs" in result.stdout
    summary = json.loads(result.stdout.split("JSON ", 1)[1])
    assert set(summary["results"]) == {"full", "lora"}
    for rows in summary["results"].values():
        assert [row["iteration"] for row in rows] == [1, 2]
        assert all(row["pairs"] > 0 and row["train_tokens_per_s"] > 0 and row["loop_pairs_per_s"] > 0 for row in rows)
    # A LoRA checkpoint is the adapter: a small fraction of the full one.
    assert summary["results"]["lora"][0]["checkpoint_mib"] < 0.25 * summary["results"]["full"][0]["checkpoint_mib"]
