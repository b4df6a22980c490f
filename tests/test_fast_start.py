"""The fast command-line start reaches into Prefect internals (flows/fast_start.py): on a Prefect where one of
them changed, this fails loudly, and the fast path steps aside so Prefect starts its own server."""

import prefect
import pytest

from flows import fast_start


def test_every_prefect_internal_the_fast_path_uses_exists_in_this_prefect():
    missing = fast_start.missing_prefect_internals()
    assert not missing, (f"Prefect {prefect.__version__} lacks {missing}: the fast start and exit "
                         "(flows/fast_start.py) now fall back to Prefect's own; update them for this version")


def test_a_missing_internal_leaves_the_server_start_to_prefect(monkeypatch):
    import prefect.context

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delattr(prefect.context, "refresh_global_settings_context")  # as on a Prefect that renamed it
    assert fast_start.missing_prefect_internals() == ["prefect.context.refresh_global_settings_context"]
    assert fast_start.start_ephemeral_server_early() is None
    assert fast_start.hand_to_prefect(None) is False  # nothing to hand over: Prefect starts its server itself


@pytest.mark.slow
def test_a_command_line_run_uses_the_early_server_without_importing_the_servers_own_modules(tmp_path):
    """The early server is handed over by URL: the run's process never imports Prefect's server stack (1.4 s),
    Prefect starts no second server, and prints no link to a UI nobody serves."""
    import subprocess
    import sys

    from tests.helpers import REPO, prefect_env, write_config

    config = write_config(tmp_path, str(tmp_path / "store"), iterations=1)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.iterative_dpo", "--config", str(config)],
                          cwd=REPO, env=prefect_env(tmp_path), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "prefect.flow_engine" in imported  # what -X importtime shows: this process's
    assert "prefect.server.api.server" not in imported
    assert output.count("Starting temporary server") == 1 and "View at" not in output
    assert "Stopping temporary server" in output


def test_the_flows_import_without_torch_so_the_server_boots_while_torch_loads():
    """cli_run starts Prefect's server and then imports torch (the preflight) while the server boots: were
    a flow module or a quick check to import torch itself (as the annotation package once did, through the human
    annotator's form types, and the LoRA target check), the server would start up to 4 s later, after it."""
    import subprocess
    import sys

    from tests.helpers import REPO

    modules = ["flows.iterative_dpo", "flows.offline", "flows.cli", "flows.stages", "alignment_core.annotation"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            # the preflight's quick checks run before the server starts: on the shipped configs, without torch
            "from flows.common import config_from_cli, parse_cli\n"
            "from alignment_core.preflight import quick_problems\n"
            "for path in ('configs/tiny.yaml', 'configs/demo.yaml'):\n"
            "    assert not quick_problems(config_from_cli(parse_cli('test', ['--config', path])))\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_the_annotation_package_still_exports_every_name_lazily():
    import alignment_core.annotation as annotation
    from alignment_core.annotation.scorers import RewardModelAnnotator

    assert annotation.RewardModelAnnotator is RewardModelAnnotator
    for name in annotation.__all__:
        assert getattr(annotation, name) is not None
    with pytest.raises(AttributeError, match="NoSuchThing"):
        annotation.NoSuchThing  # noqa: B018


@pytest.mark.slow
def test_inside_a_command_line_run_prefect_talks_to_the_early_server_and_flow_runs_send_no_heartbeats(tmp_path):
    """Heartbeats tell a server that a flow run's process died; this server dies with the process. Prefect's
    heartbeat thread sleeps in 1 s steps, and each flow run's end waited for it to wake."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, prefect_env, write_config

    config = write_config(tmp_path, str(tmp_path / "store"))
    code = f"""
import json, os
from prefect.settings import get_current_settings
from flows.common import cli_run, parse_cli
outside = get_current_settings().flows.heartbeat_frequency
with cli_run(parse_cli("test", ["--config", {str(config)!r}])):
    settings = get_current_settings()
    print(json.dumps({{"outside": outside, "inside": settings.flows.heartbeat_frequency,
                       "api_url": settings.api.url, "env_api_url": os.environ["PREFECT_API_URL"]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=prefect_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["outside"] == 180 and seen["inside"] is None
    assert seen["api_url"] == seen["env_api_url"] and seen["api_url"].startswith("http://127.0.0.1:")
