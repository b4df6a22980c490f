"""The lease's expiry and the store's conditional writes at their edges (the mutation round's survivors: an
expired lease that nobody took over still let its writer write; a conditional write made unconditional)."""

import json

import pytest

from alignment_core.lease import LeaseLost, RunLease, check_lease, read_lease
from alignment_core.store import ArtifactStore
from tests.helpers import metrics_table


def set_expiry(store: ArtifactStore, run: str, expires_at: float) -> None:
    """Rewrite the run's lease document with another expiry, as a stalled heartbeat leaves it."""
    lease, version = read_lease(store, run)
    assert store.replace_if(store.uri(run, "_lease.json"), json.dumps({**lease, "expires_at": expires_at}).encode(),
                            version)


@pytest.mark.fault("lease expired, not taken over")
def test_an_expired_lease_stops_its_writer_even_when_nobody_took_it_over(tmp_path):
    store = ArtifactStore(str(tmp_path))
    lease = RunLease(store, "r", timeout_s=600, heartbeat_s=3600).acquire()
    writer_store = ArtifactStore(str(tmp_path), lease_token=lease.token)
    writer = writer_store.stage_writer(writer_store.stage_uri("r", 1, "metrics"), "metrics", {"v": 1})
    now = json.loads((tmp_path / "r" / "_lease.json").read_text())["renewed_at"]

    set_expiry(store, "r", now + 30)  # 30 s left: still the writer's
    writer.write_shard(0, metrics_table(0, 2))
    assert check_lease(store, "r", lease.token)["token"] == lease.token

    set_expiry(store, "r", now - 0.001)  # just past: nothing more is written
    with pytest.raises(LeaseLost, match="expired at .* without renewal"):
        writer.write_shard(1, metrics_table(2, 2))
    with pytest.raises(LeaseLost, match="expired"):
        check_lease(store, "r", lease.token)
    assert writer.done_shards == {0}


def test_a_conditional_write_refuses_when_the_object_changed(tmp_path):
    store = ArtifactStore(str(tmp_path))
    uri = store.uri("r", "doc.json")
    store.write_bytes(uri, b"first")
    _, first = store.read_versioned(uri)
    assert store.replace_if(uri, b"second", first)
    assert store.read_versioned(uri)[0] == b"second"
    assert not store.replace_if(uri, b"third", first)  # written against a version that is gone
    assert not store.delete_if(uri, first)
    assert store.read_versioned(uri)[0] == b"second"
    assert not store.replace_if(store.uri("r", "absent.json"), b"x", first)
    _, second = store.read_versioned(uri)
    assert store.delete_if(uri, second) and not store.exists(uri)
