"""Code a config names (reward functions): importable only from the modules the allow-list names, when it is set."""

import json

import pytest
import yaml

from alignment_core.annotation.scorers import ALLOWED_CODE_ENV, import_callable
from alignment_core.rewards import positive_words
from tests.helpers import REPO

# --- the allow-list for config-named code ---------------------------------------------------------------------


def test_without_the_allow_list_any_module_is_importable(monkeypatch):
    monkeypatch.setenv(ALLOWED_CODE_ENV, "recorded")
    monkeypatch.delenv(ALLOWED_CODE_ENV)
    assert import_callable("json:dumps") is json.dumps


def test_the_allow_list_refuses_other_modules_before_importing_them(monkeypatch, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "hardening_payload.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef reward(prompt, response):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ALLOWED_CODE_ENV, "alignment_core.")
    assert import_callable("alignment_core.rewards:positive_words") is positive_words
    with pytest.raises(ValueError, match=r"module 'hardening_payload' is not allowed here: ALIGNMENT_CORE_ALLOWED_"
                                         r"CODE allows only modules under \['alignment_core.'\]"):
        import_callable("hardening_payload:reward")
    assert not marker.exists()  # refused before its code ran
    # Not through an allowed module to something it imported.
    with pytest.raises(ValueError, match=r"'re.compile' is defined elsewhere.*module 're' is not allowed"):
        import_callable("alignment_core.rewards:re.compile")
    with pytest.raises(ValueError, match="not allowed"):  # the same rule for evaluation.oracle
        from alignment_core.evaluation import load_callable

        load_callable("os:system")
    for setting in ("alignment_core., hardening_payload", "*"):
        monkeypatch.setenv(ALLOWED_CODE_ENV, setting)
        assert import_callable("hardening_payload:reward")("p", "r") == 1.0
    monkeypatch.setenv(ALLOWED_CODE_ENV, "hardening")  # a prefix is a whole module name, not its first letters
    with pytest.raises(ValueError, match="not allowed"):
        import_callable("hardening_payload:reward")


def test_deployments_set_the_allow_list(monkeypatch):
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    for deployment in document["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]  # a pool's job variables: `prefect deploy` reads them
        assert env[ALLOWED_CODE_ENV] == "alignment_core.", deployment["name"]
    import flows.serve

    for setting in flows.serve.ALLOW_LISTS:  # so that monkeypatch unsets what main() sets
        monkeypatch.setenv(setting, "recorded")
        monkeypatch.delenv(setting)
    served = []
    monkeypatch.setattr(flows.serve, "serve", lambda *deployments: served.extend(deployments))
    monkeypatch.setattr(flows.serve, "deployments", lambda *options: ["d"])
    flows.serve.main([])
    import os

    assert served == ["d"] and os.environ[ALLOWED_CODE_ENV] == "alignment_core."


def test_no_test_leaves_the_allow_list_set():
    import os

    assert ALLOWED_CODE_ENV not in os.environ
