"""No secret of the worker reaches the store, the logs or Prefect's database, whatever quotes it back.

Two real flow runs (`python -m flows.iterative_dpo`, ephemeral Prefect) with a secret planted where real
failures put one: an HTTP judge on loopback that quotes the key it was sent in its 200 answers (which go to the
judge cache), an HTML error page, an error JSON (`token=...`) and a 401 body (which stops the stage: the flow
run fails, its state message quoting the error); a reward function whose exception quotes a token of the
environment. The secrets are plain random strings, no shape `redact` knows:
only masking by value catches them. Then every file of the store and of PREFECT_HOME (its database holds the
runs' logs, artifacts and states) and the captured output are searched for them.
"""

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import fault_note
from tests.helpers import REPO, SMALL, prefect_env, write_config
from tests.test_annotation_http import completion, serving

pytestmark = pytest.mark.slow

JUDGE_KEY_ENV = "JUDGE_LOGIN"  # no secret-shaped name: masked because the config names it


class QuotingJudge(BaseHTTPRequestHandler):
    """Serves "judge-model"; answers chat requests by their order of arrival (`script`): "A" with the key it
    was sent in its text, or a failure quoting that key (an HTML page, an error JSON, a provider's 401)."""

    script: list[str] = []  # what the next requests get; once it is empty, answers
    keys_seen: set[str] = set()
    lock = threading.Lock()

    def _send(self, status: int, body: str, content_type: str = "application/json") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send(200, json.dumps({"data": [{"id": "judge-model"}]}))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.lock:
            self.keys_seen.add(key)
            failure = self.script.pop(0) if self.script else "answer"
        if failure == "401":
            self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {key}.",
                                                  "type": "invalid_request_error"}}))
        elif failure == "html":  # a proxy's page: a server error, retried (not here: max_retries 0)
            self._send(502, f"<html><body><h1>Forbidden</h1><p>key {key} is not allowed</p></body></html>",
                       "text/html")
        elif failure == "json":
            self._send(400, json.dumps({"detail": f"rejected request with token={key}"}))
        else:
            self._send(200, json.dumps(completion(f"A (request signed {key})", [("A", -0.05), ("B", -2.5)])))


def leaky_reward(prompt: str, response: str) -> float:
    """A reward function that fails on some responses with an error quoting a token of the environment."""
    if len(response) % 3 == 0:
        raise PermissionError(f"scoring service refused token={os.environ['HF_TOKEN']}")
    return float(len(response) % 5)


def files_holding(secret: str, *folders: Path) -> list[str]:
    """The files under `folders` whose bytes, or whose Parquet cells, contain `secret`."""
    hits = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            if secret.encode() in path.read_bytes():
                hits.append(str(path))
            elif path.suffix == ".parquet" and secret in json.dumps(pq.read_table(path).to_pylist(), default=str):
                hits.append(str(path))  # a compressed page can hide it from a byte search
    return hits


def prefect_rows(prefect_home: Path, table: str) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [json.dumps(row, default=str) for row in db.execute(f"SELECT * FROM {table}")]  # noqa: S608


def run_and_search(request, tmp_path: Path, secret: str, env_name: str, **config) -> tuple[Path, list[str]]:
    """Run the flow with `secret` in the environment as `env_name` (to its end, failed or not); the store and
    where the secret was found."""
    store = tmp_path / "store"
    env = prefect_env(tmp_path, **{env_name: secret})
    config_path = write_config(tmp_path, str(store), iterations=1, **config)
    result = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config", str(config_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    fault_note(request, f"flow run exit status {result.returncode}")
    prefect_home = Path(env["PREFECT_HOME"])
    assert prefect_rows(prefect_home, "artifact") and prefect_rows(prefect_home, "log")  # what is searched exists
    found = files_holding(secret, store, prefect_home)
    found += [f"{where} of the run" for where, text in (("stdout", result.stdout), ("stderr", result.stderr))
              if secret in text]
    found += [f"Prefect {table}" for table in ("artifact", "log", "flow_run_state", "task_run_state")
              if any(secret in row for row in prefect_rows(prefect_home, table))]
    return store, found


@pytest.mark.fault("secret quoted back by a judge")
def test_a_judge_quoting_the_key_back_leaves_no_trace_of_it(request, tmp_path):
    secret = secrets.token_hex(16)
    # The first shard's 4 requests are answered (and cached); the second's meet the failures, the 401 last.
    QuotingJudge.script, QuotingJudge.keys_seen = ["answer"] * 4 + ["html", "json", "401"], set()
    with serving(QuotingJudge) as url:
        store, found = run_and_search(
            request, tmp_path, secret, JUDGE_KEY_ENV,
            annotation={"annotator": "judge_pairwise", "max_failure_fraction": 1.0,
                        "judge": {"backend": "http", "base_url": url, "model": "judge-model",
                                  "api_key_env": JUDGE_KEY_ENV, "max_retries": 0}},
            evaluation={**SMALL["evaluation"], "enabled": False})
    assert QuotingJudge.keys_seen == {secret} and QuotingJudge.script == []  # it was sent, and quoted back
    assert found == []
    masked = files_holding("***", store)
    assert any("/annotations/" in path for path in masked) and any("/_judge_cache/" in path for path in masked)


@pytest.mark.fault("secret in a reward function's error")
def test_a_reward_function_quoting_a_token_leaves_no_trace_of_it(request, tmp_path):
    secret = secrets.token_hex(16)
    store, found = run_and_search(
        request, tmp_path, secret, "HF_TOKEN",
        annotation={"annotator": "programmatic", "programmatic": "tests.test_secret_leaks:leaky_reward",
                    "max_failure_fraction": 1.0},
        evaluation={**SMALL["evaluation"], "enabled": False})
    assert found == []
    assert any("/annotations/" in path for path in files_holding("token=***", store))  # the error was recorded
