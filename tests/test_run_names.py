"""A run is one folder under the store root: a run name that is a path is refused at config load."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment_core.config import ConfigError, load_config, parse_config
from alignment_core.store import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
BAD = ["../../x", "..", ".", "", "a/b", "a\\b", "/abs", "x/..", ".hidden", "_lease"]


@pytest.mark.parametrize("name", BAD)
def test_a_run_name_that_is_not_one_folder_fails_at_load(name, tmp_path):
    with pytest.raises(ConfigError, match="store.run_name"):
        parse_config({"store": {"root": str(tmp_path), "run_name": name}})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"store": {"root": str(tmp_path), "run_name": name}}))
    with pytest.raises(ConfigError, match="store.run_name"):
        load_config(config)


@pytest.mark.parametrize("name", ["tiny", "nightly-2026.11.25", "run_1", "a..b"])
def test_ordinary_run_names_load(name):
    assert parse_config({"store": {"run_name": name}}).store.run_name == name


def test_the_flows_flat_run_name_parameter_is_checked_too(tmp_path):
    from flows.common import with_overrides

    cfg = parse_config({"store": {"root": str(tmp_path / "root")}})
    with pytest.raises(ValueError, match="run_name"):
        with_overrides(cfg, run_name="../escaped")


def test_the_store_refuses_path_segments_that_leave_it(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    for run in ("../x", "..", "", "a/b"):
        with pytest.raises(ValueError, match="single folder name"):
            store.stage_uri(run, 1, "prompts")
    with pytest.raises(ValueError, match="single folder name"):
        store.stage_uri("run", 1, "../../prompts")
    assert store.stage_uri("run", 1, "prompts") == str(tmp_path / "root" / "run" / "iter-001" / "prompts")


def test_the_command_line_refuses_it_before_writing_anything(tmp_path):
    root = tmp_path / "deep" / "root"
    result = subprocess.run(
        [sys.executable, "-m", "flows.iterative_dpo", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--store-root", str(root), "--run-name", "../../escaped"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "run_name" in result.stderr and "single folder name" in result.stderr
    assert not (tmp_path / "escaped").exists() and not root.exists()
