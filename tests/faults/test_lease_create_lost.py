"""S3: the response to the lease's conditional create is lost. The server created `_lease.json`; the client's
retry of the PUT is refused (the lease exists). The lease reads itself back, recognises its own token and holds
the run, instead of reporting the run as held by someone else."""

import pytest

from alignment_core.lease import LEASE_FILE, RunLease, check_lease, read_lease
from alignment_core.store import ArtifactStore
from tests.conftest import fault_note
from tests.faults.s3proxy import FaultProxy


@pytest.mark.fault("S3 lease create: response lost")
def test_a_lease_whose_create_response_was_lost_recognises_itself(request, s3_server, tmp_path):
    bucket = f"s3://artifacts/lease-lost-{tmp_path.name}"
    direct = ArtifactStore(bucket, endpoint_url=s3_server)
    proxy = FaultProxy(s3_server, schedule={1: "lose-response"}, only=lambda path: path.endswith(LEASE_FILE))
    try:
        store = ArtifactStore(bucket, endpoint_url=proxy.url)
        with RunLease(store, "r", holder={"flow_run_id": "run-1"}, timeout_s=60) as lease:
            assert proxy.injected == [(proxy.puts[0][0], "lose-response")]
            assert len(proxy.puts) >= 2  # the client sent the create again, and was refused
            lease_doc, _ = read_lease(direct, "r")
            assert lease_doc["token"] == lease.token and lease_doc["holder"]["flow_run_id"] == "run-1"
            assert check_lease(direct, "r", lease.token)["token"] == lease.token  # its writers may write
        assert read_lease(direct, "r") is None  # released as usual
    finally:
        proxy.close()
    fault_note(request, f"create answered by the server, its response reset; {len(proxy.puts)} lease PUTs; "
                        "the lease read back its own token and held the run")
