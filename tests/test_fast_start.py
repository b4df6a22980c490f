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
    from prefect.server.api.server import SubprocessASGIServer

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delattr(SubprocessASGIServer, "find_available_port")  # as on a Prefect that renamed it
    assert fast_start.missing_prefect_internals() == [
        "prefect.server.api.server.SubprocessASGIServer.find_available_port"]
    assert fast_start.start_ephemeral_server_early() is None
    fast_start.hand_to_prefect(None)  # nothing to hand over: Prefect starts its server on the first client


def test_the_flows_import_without_torch_so_the_server_boots_while_torch_loads():
    """start_cli_run starts Prefect's server and then imports torch (the preflight) while the server boots: were
    a flow module to import torch itself (as the annotation package once did, through the human annotator's
    form types), the server would start 4 s later, after it."""
    import subprocess
    import sys

    modules = ["flows.iterative_dpo", "flows.offline", "flows.cli", "flows.stages", "alignment_core.annotation"]
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_the_annotation_package_still_exports_every_name_lazily():
    import alignment_core.annotation as annotation
    from alignment_core.annotation.scorers import RewardModelAnnotator

    assert annotation.RewardModelAnnotator is RewardModelAnnotator
    for name in annotation.__all__:
        assert getattr(annotation, name) is not None
    with pytest.raises(AttributeError, match="NoSuchThing"):
        annotation.NoSuchThing  # noqa: B018
