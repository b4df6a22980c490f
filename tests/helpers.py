"""What many test files use: the repository, a small online config, a Prefect environment of its own for a
flow run in a subprocess (as a user runs it), and small tables and files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import yaml

from alignment_core.records import METRICS, from_rows

REPO = Path(__file__).resolve().parent.parent

# A small online setup: 8 prompts x 2 samples per iteration, shards of 2 prompts (4 shards to kill between).
SMALL = {
    "setup": "online_pairwise",
    "iterations": 2,
    "data": {"source": "bundled:prompts", "eval_prompts": 4},
    "model": {"policy": "tiny://llama"},
    "generation": {"backend": "transformers", "prompts_per_iteration": 8, "n_samples": 2, "max_new_tokens": 12,
                   "shard_size": 2, "batch_size": 8},
    "annotation": {"annotator": "programmatic", "programmatic": "alignment_core.rewards:positive_words"},
    "reweight": {"strategy": "margin"},
    "training": {"loss": "dpo", "batch_size": 4, "learning_rate": 1e-4},
    "evaluation": {"max_new_tokens": 12, "oracle": "alignment_core.rewards:positive_words"},
    "store": {"run_name": "e2e"},
}


def prefect_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PREFECT_LOGGING_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


def write_config(tmp_path: Path, root: str, **changes) -> Path:
    config = {**SMALL, "store": {**SMALL["store"], "root": root}, **changes}
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_flow(config: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(config), *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def metrics_table(start: int, n: int) -> pa.Table:
    """Training-loss rows for steps start..start+n-1 (METRICS records)."""
    rows = [{"step": s, "split": "train", "metric": "loss", "value": s / 10} for s in range(start, start + n)]
    return from_rows(rows, METRICS)
