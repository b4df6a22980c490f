"""The fast command-line start reaches into Prefect internals (flows/fast_start.py): on a Prefect where one of
them changed, this fails loudly, and the fast path steps aside so Prefect starts its own server."""

import prefect

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
