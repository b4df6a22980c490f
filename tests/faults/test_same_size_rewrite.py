"""A generations shard rewritten to the same size (other bytes, same rows, still readable Parquet) between two
runs of the flow: the rerun's completeness check finds the sha256 differs, redoes that shard only, and the
run's data is what it was before the damage."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from alignment_core.store import ArtifactStore
from tests.conftest import fault_note
from tests.helpers import REPO, prefect_env, run_flow, write_config
from tests.test_verified_shards import rewrite_same_size


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


@pytest.mark.slow
@pytest.mark.fault("shard rewritten, same size (flow rerun)")
def test_a_rerun_redoes_a_shard_rewritten_to_the_same_size(request, tmp_path, tiny_model_dir):
    root = tmp_path / "store"
    config = write_config(tmp_path, str(root), iterations=1, evaluation={"enabled": False},
                          model={"policy": str(tiny_model_dir)})
    env = prefect_env(tmp_path)
    run_flow(config, env)
    store = ArtifactStore(str(root))
    generations = Path(store.stage_uri("e2e", 1, "generations"))
    before = digests(generations)
    rows = store.read_pandas(str(generations))
    annotations = Path(store.stage_uri("e2e", 1, "annotations"), "_manifest.json").read_text()

    damaged = generations / "part-00001.parquet"
    size = damaged.stat().st_size
    rewrite_same_size(damaged)
    assert damaged.stat().st_size == size and digests(generations)[damaged.name] != before[damaged.name]
    untouched = {p.name: p.stat().st_mtime_ns for p in generations.glob("part-*.parquet") if p != damaged}

    rerun = run_flow(config, env)
    assert f"{damaged.name} has sha256" in rerun.stdout + rerun.stderr  # the stage was found damaged ...
    assert digests(generations) == before  # ... and that shard was written again, to the same bytes
    assert {name: (generations / name).stat().st_mtime_ns for name in untouched} == untouched
    pd.testing.assert_frame_equal(store.read_pandas(str(generations)), rows)
    # The redone stage has its old fingerprint: the stages after it were found complete, not redone.
    assert Path(store.stage_uri("e2e", 1, "annotations"), "_manifest.json").read_text() == annotations
    verified = subprocess.run([sys.executable, "-m", "alignment_core.inspect", str(root / "e2e"), "--verify"],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    fault_note(request, f"{damaged.name} rewritten to the same {size} bytes; the rerun redid it alone")
