"""What a run shows in the Prefect UI and writes to its log.

The end-to-end test starts `prefect server start` as the README does (UI on, a non-default port,
`PREFECT_UI_API_URL=/api`, no `PREFECT_API_URL` for the server), runs the online flow against it with its output
captured as a log file, then reads the flow run's artifacts through the API and opens the evaluation artifact in
headless Chromium (Debian's `chromium`; `make test` installs it). The rest are quick checks of the pieces.
"""

import base64
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from alignment_core import progress
from alignment_core.verdict import significance_line
from tasks.report import by_iteration, summary_markdown, throttled
from tests.conftest import free_port
from tests.helpers import REPO, prefect_env, write_config
from tests.test_deployment import wait_healthy

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=20000")
RUN = "e2e"  # tests/test_flows.py SMALL's run name
KINDS = ("config", "summary", "evaluation", "evaluation-table", "metrics", "samples", "generate-progress",
         "train-progress")
# matplotlib's first line colour (C0, #1f77b4): the plot's curves; nothing else on the UI's page is this blue.
PLOT_BLUE = np.array([31, 119, 180])


def chromium(tmp_path, url: str, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium not found: apt-get install chromium (make test installs it)"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", *args, url],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.mark.slow
def test_a_run_shows_its_evaluation_in_the_ui_and_logs_short_lines(tmp_path):
    port = free_port()  # not 4200: the UI must find its API on the port it was served from
    base = f"http://127.0.0.1:{port}"
    server_env = {**prefect_env(tmp_path), "PREFECT_UI_API_URL": "/api"}  # the README's start, no PREFECT_API_URL
    with open(tmp_path / "server.log", "w") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"], env=server_env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(f"{base}/api", server)
            run_log = tmp_path / "run.log"
            with open(run_log, "w") as log:  # the run's output as a log file: not a terminal
                run = subprocess.run([sys.executable, "-m", "flows.iterative_dpo", "--config",
                                      str(write_config(tmp_path, str(tmp_path / "store")))],
                                     cwd=REPO, env={**prefect_env(tmp_path), "PREFECT_API_URL": f"{base}/api"},
                                     stdout=log, stderr=subprocess.STDOUT, timeout=900)
            output = run_log.read_bytes().decode()  # not read_text: it would turn each "\r" into "\n"
            assert run.returncode == 0, output[-5000:]
            check_run_log(output)
            check_artifacts_and_page(tmp_path, base, output)
            check_quiet_offline_run(tmp_path, base)
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def check_run_log(output: str) -> None:
    """No progress bar, no config dump, no dict of every number: a few short lines per iteration."""
    assert "\r" not in output
    assert "max_new_tokens" not in output and "prompts_per_iteration" not in output  # the config's YAML
    assert re.search(rf"run {RUN} under .*: setup online_pairwise, loss dpo, 2 iterations; config in artifact "
                     rf"{RUN}-config", output), output[:3000]
    for k in (1, 2):
        assert re.search(rf"iteration {k}: train_loss [\d.]+, .*; every number in artifact {RUN}-metrics", output)
        assert re.search(rf"iteration {k}: win-rate vs initial, judged by .*: [\d.]+ \[[\d.]+, [\d.]+\] over 4 "
                         r"held-out prompts: ", output)
    flow_lines = [line for line in output.splitlines() if "| Flow run " in line]
    assert max(len(line) for line in flow_lines) < 400, max(flow_lines, key=len)


def check_artifacts_and_page(tmp_path, base: str, output: str) -> None:
    api = f"{base}/api"
    [flow_run] = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).json()
    artifacts = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}, timeout=30).json()
    # One artifact per kind for the run, updated at each of its two iterations.
    assert sorted(a["key"] for a in artifacts) == sorted(f"{RUN}-{kind}" for kind in KINDS)
    by_kind = {a["key"].removeprefix(f"{RUN}-"): a for a in artifacts}

    # The verdict leads the summary, and it is the log's verdict for the last iteration.
    summary_lines = by_kind["summary"]["data"].splitlines()
    assert summary_lines[0] == f"# {RUN}: iteration 2"
    verdict = re.search(r"iteration 2: (win-rate vs initial, judged by .*)", output).group(1)
    assert summary_lines[2] == f"**{verdict}**"
    assert summary_lines[4] == "## Evaluation"
    # The UI's log of the run: the verdict there too, the config and progress bars not.
    messages = [entry["message"] for entry in httpx.post(
        f"{api}/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "limit": 200},
        timeout=30).json()]
    assert f"iteration 2: {verdict}" in messages
    assert not any("\r" in message or "max_new_tokens" in message for message in messages)

    # Both iterations' numbers, as printed in the command line's closing table.
    metrics = {row["metric"]: row for row in json.loads(by_kind["metrics"]["data"])}
    printed = re.search(r"^iteration +(.*)\n +1 +(.*)\n +2 +(.*)$", output, re.MULTILINE)
    columns = printed.group(1).split()
    for k, values in ((1, printed.group(2).split()), (2, printed.group(3).split())):
        for column, value in zip(columns, values, strict=True):
            assert metrics[column][f"iteration {k}"] == pytest.approx(float(value), rel=1e-3), (column, k)
    evaluation = {row["metric"]: row for row in json.loads(by_kind["evaluation-table"]["data"])}
    assert evaluation["oracle_win_rate_vs_initial"]["iteration 2"] == metrics["oracle_win_rate_vs_initial"][
        "iteration 2"]
    assert set(evaluation["oracle_win_rate_vs_initial"]) == {"metric", "iteration 1", "iteration 2"}
    assert "max_new_tokens: 12" in by_kind["config"]["data"]

    # The figure travels inside the artifact: a PNG data URI of a real plot.
    image = re.search(r"!\[[^\]]*\]\((data:image/png;base64,([A-Za-z0-9+/=]+))\)", by_kind["evaluation"]["data"])
    assert image, by_kind["evaluation"]["data"][:500]
    figure = png_pixels(base64.b64decode(image.group(2)))
    assert figure.shape[0] > 200 and figure.shape[1] > 400 and figure.std() > 20
    assert (np.abs(figure - PLOT_BLUE).sum(axis=2) < 30).sum() > 100

    # The UI renders it: the artifact's page holds that <img>, and a screenshot of the page shows the plot.
    settings = httpx.get(f"{base}/ui-settings", timeout=10).json()
    assert settings["api_url"] == "/api"  # the page's own origin: right on any port, from any machine
    ui = settings["v2_base_url"] if settings["default_ui"] == "v2" else settings["v1_base_url"]
    page = f"{base}{ui.rstrip('/')}/artifacts/artifact/{by_kind['evaluation']['id']}"
    dom = chromium(tmp_path, page, "--dump-dom")
    assert "Unable to connect" not in dom
    img = re.search(r'<img [^>]*src="(data:image/png;base64,[^"]+)"', dom)
    assert img and img.group(1) == image.group(1), dom[-3000:]
    shot = tmp_path / "evaluation-artifact.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1400,1400")
    pixels = png_pixels(shot.read_bytes())
    assert (np.abs(pixels - PLOT_BLUE).sum(axis=2) < 30).sum() > 100, f"no plot in the screenshot {shot}"



def check_quiet_offline_run(tmp_path, base: str) -> None:
    """The offline flow publishes the same artifacts (but samples and generation: it generates none), and
    `--log-level WARNING`
    leaves its console and its log in the UI without a single INFO line."""
    run = subprocess.run([sys.executable, "-m", "flows.offline", "sft", "--config", "configs/sft.yaml",
                          "--store-root", str(tmp_path / "store"), "--log-level", "WARNING",
                          "--set", "data.eval_prompts=4", "--set", "evaluation.max_new_tokens=12"],
                         cwd=REPO, env={**prefect_env(tmp_path), "PREFECT_API_URL": f"{base}/api"},
                         capture_output=True, timeout=900)  # bytes: text mode would turn each "\r" into "\n"
    printed, output = run.stdout.decode(), run.stdout.decode() + run.stderr.decode()
    assert run.returncode == 0, output[-5000:]
    assert "run tiny-sft finished" in printed and "win-rate vs initial" in printed  # printed, not logged
    assert " | INFO " not in output and "\r" not in output, output[-3000:]
    [flow_run] = httpx.post(f"{base}/api/flow_runs/filter", json={"flows": {"name": {"any_": ["sft"]}}},
                            timeout=30).json()
    artifacts = httpx.post(f"{base}/api/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}, timeout=30).json()
    # the held-out samples go through the generate task, with its progress artifact, offline too
    assert sorted(a["key"] for a in artifacts) == sorted(f"tiny-sft-{kind}" for kind in KINDS if kind != "samples")
    levels = {entry["level"] for entry in httpx.post(
        f"{base}/api/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}}, timeout=30).json()}
    assert not levels or min(levels) >= logging.WARNING, levels

def test_summary_markdown_leads_with_the_verdict_then_the_evaluation():
    summary = {"iteration": 3, "checkpoint": "/store/r/iter-003/checkpoint", "train_loss": 0.61,
               "data_rows_kept": 200, "win_rate_vs_initial": 0.8, "win_rate_vs_initial_low": 0.6,
               "win_rate_vs_initial_high": 0.9, "judged_vs_initial": 32.0, "generation_tokens_per_s": 812.5}
    lines = summary_markdown("r", summary, {"checkpoint": summary["checkpoint"]}, {"checkpoint": None})
    lines = lines.splitlines()
    assert lines[:3] == ["# r: iteration 3", "", f"**{significance_line(summary)}**"]
    assert "significantly better than the initial policy" in lines[2]
    sections = [line for line in lines if line.startswith("## ")]
    assert sections == ["## Evaluation", "## Data", "## Generation", "## Training", "## Outputs"]
    assert "| tokens_per_s | 812.5 | tokens/s |" in lines
    assert "| checkpoint |  | `/store/r/iter-003/checkpoint` | the trained policy (safetensors) with its lineage |" \
        in lines


def test_by_iteration_has_a_column_per_iteration_and_a_row_per_metric():
    rows = by_iteration({2: {"loss": 0.123456, "steps": 4}, 1: {"loss": 0.7}})
    assert rows == [{"metric": "loss", "iteration 1": 0.7, "iteration 2": 0.1235},
                    {"metric": "steps", "iteration 1": None, "iteration 2": 4}]


def test_reward_model_verdict_reads_the_held_out_accuracy():
    summary = {"heldout_pairs": 40.0, "heldout_accuracy": 0.8, "heldout_accuracy_low": 0.65,
               "heldout_accuracy_high": 0.9}
    assert significance_line(summary) == ("held-out accuracy of the reward model: 0.80 [0.65, 0.90] over 40 "
                                          "held-out pairs: significantly better than chance")
    assert "not distinguishable from chance" in significance_line({**summary, "heldout_accuracy_low": 0.45})


def test_a_ui_progress_bar_moves_at_most_every_interval_and_always_at_the_end():
    sent = []
    update = throttled(sent.append, interval_s=60)
    for step in range(1, 129):  # a round of 128 steps, well within the interval
        update(step, 128)
    assert sent == [100 / 128, 100.0]
    update = throttled(sent.append, interval_s=0)
    sent.clear()
    for shard in range(1, 4):
        update(shard, 4)
    assert sent == [25.0, 50.0, 75.0]


def test_progress_bars_show_on_a_terminal_only_unless_told(monkeypatch, capsys):
    from transformers.utils import logging as transformers_logging

    monkeypatch.delenv(progress.SETTING, raising=False)
    assert not progress.enabled()  # pytest captures stderr: not a terminal
    with progress.bar(range(3), desc="hidden") as bar:
        list(bar)
    assert capsys.readouterr().err == ""
    try:
        progress.set_enabled(True)  # --progress
        assert progress.enabled() and transformers_logging.is_progress_bar_enabled()
        progress.set_enabled(False)  # --no-progress
        assert not progress.enabled() and not transformers_logging.is_progress_bar_enabled()
        monkeypatch.setenv(progress.SETTING, "sometimes")
        with pytest.raises(ValueError, match="ALIGNMENT_CORE_PROGRESS='sometimes': expected 1"):
            progress.enabled()
    finally:
        monkeypatch.delenv(progress.SETTING, raising=False)
        progress.apply_to_libraries()


def test_log_level_applies_to_run_and_library_loggers():
    from flows import logs

    before = {name: logging.getLogger(name).level for name in logs.LOGGERS}
    try:
        logs.configure("WARNING", None)
        for name in ("prefect.flow_runs", "prefect.task_runs", "alignment_core.training"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
