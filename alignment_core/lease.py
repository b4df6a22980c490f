"""The run lease: one writer per run at a time.

Two flow runs on the same run (a scheduled run overlapping a slow earlier one, a deployment started twice)
would otherwise interleave their stage writers: one clears the other's shards on a fingerprint mismatch and
the other then writes a manifest over a mix of rows from both configs. The lease is a small JSON document,
`{root}/{run}/_lease.json`, created atomically by the run's owner (see `ArtifactStore.create_exclusive`),
renewed by a heartbeat thread while the owner works, and deleted when it is done:

    with RunLease(store, "tiny", holder={"flow_run_id": ...}, timeout_s=600) as lease:
        ...                                   # store writers check lease.token (ArtifactStore.lease_token)

A second owner gets `LeaseHeld`, naming the holder (flow run, host, pid, since when, until when), before it
writes anything. A lease that was not renewed for `timeout_s` has expired and is taken over, so a crashed
owner blocks the run for at most that long; an owner on this same machine whose process is gone is taken
over at once. An owner that finds its lease taken over (it stalled past the timeout) gets `LeaseLost` from
its next write instead of overwriting the new owner's work.

Expiry compares wall clocks of the machines involved: keep them synchronised (NTP) well within the timeout.
This module is plain library code: the flows pass in what describes them (a Prefect flow run id, say).
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TIMEOUT_S = 600.0


class LeaseError(RuntimeError):
    """The run cannot be written by this caller."""


class LeaseHeld(LeaseError):
    """Another owner holds a live lease on the run."""

    def __init__(self, run_uri: str, lease: dict):
        self.lease = lease
        super().__init__(f"run {run_uri} is in use: {describe(lease)}. Stopped before writing any stage. Wait "
                         "for that run to finish or, if it died, for its lease to expire (or delete "
                         f"{run_uri}/{LEASE_FILE} once you are sure it is gone)")


class LeaseLost(LeaseError):
    """The caller's lease on the run has expired, was released, or was taken over."""


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(lease: dict) -> str:
    """One line naming a lease's holder: flow run, host, pid, since when and until when."""
    holder = lease.get("holder", {})
    parts = [f"{key} {holder[key]}" for key in ("flow_run_name", "flow_run_id", "flow") if holder.get(key)]
    parts += [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    return (f"leased to {', '.join(parts)} since {_when(lease.get('acquired_at', 0))}, expires "
            f"{_when(lease.get('expires_at', 0))} unless renewed (every {lease.get('heartbeat_s', '?')} s while "
            "it runs)")


# ---- who this process is ---------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited: it renews nothing
        return None
    return fields[19]


def _machine() -> dict:
    """What identifies this machine and PID namespace (Linux): pids are only comparable inside both."""
    try:
        namespace = os.stat("/proc/self/ns/pid")
        pid_ns = f"{namespace.st_dev}:{namespace.st_ino}"
    except OSError:
        pid_ns = None
    return {"boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def this_process() -> dict:
    """host and pid (what people read) and what tells a dead owner from a live one on this machine."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "process": {
        **_machine(), "start_time": _start_time(os.getpid())}}


def holder_is_gone(lease: dict) -> bool:
    """True only when the holder ran on this machine (same boot, same PID namespace) and its process is gone.

    A pid reused by another process is told apart by its start time. Anywhere else, only expiry frees a run.
    """
    process = lease.get("holder", {}).get("process") or {}
    machine = _machine()
    if not process.get("boot_id") or process.get("boot_id") != machine["boot_id"] or (
        process.get("pid_ns") != machine["pid_ns"]
    ):
        return False
    pid = lease["holder"].get("pid")
    return _start_time(int(pid)) != process.get("start_time")


def is_live(lease: dict, now: float | None = None) -> bool:
    return lease.get("expires_at", 0) > (time.time() if now is None else now) and not holder_is_gone(lease)


# ---- reading and checking --------------------------------------------------------------------------------
def lease_uri(store, run: str) -> str:
    return store.uri(run, LEASE_FILE)


def read_lease(store, run: str) -> tuple[dict, str] | None:
    """(lease document, version) of the run, or None when nobody holds it."""
    current = store.read_versioned(lease_uri(store, run))
    if current is None:
        return None
    data, version = current
    try:
        return json.loads(data), version
    except ValueError:
        log.warning("%s is not a lease document; treating it as expired", lease_uri(store, run))
        return {"expires_at": 0, "holder": {}}, version


def check_lease(store, run: str, token: str | None) -> dict | None:
    """Raise unless the caller may write the run; returns the live lease document (None when unleased).

    With a token: the run's lease must be that token, live. Without one (a notebook, a test): nobody else
    may hold a live lease on the run.
    """
    current = read_lease(store, run)
    lease = current[0] if current else None
    if token is not None:
        if lease is None or lease.get("token") != token:
            held = f"; now {describe(lease)}" if lease and is_live(lease) else ""
            raise LeaseLost(f"the lease on run {store.run_uri(run)} this writer holds ({token[:8]}) is gone"
                            f"{held}: it expired or was released; nothing more is written")
        if lease.get("expires_at", 0) <= time.time():
            raise LeaseLost(f"the lease on run {store.run_uri(run)} ({token[:8]}) expired at "
                            f"{_when(lease['expires_at'])} without renewal; nothing more is written")
        return lease
    if lease is not None and is_live(lease):
        raise LeaseHeld(store.run_uri(run), lease)
    return None


# ---- holding a lease ---------------------------------------------------------------------------------------
class RunLease:
    """The lease on one run, held from `acquire()` (or `with`) to `release()`, renewed in the background.

    `holder` describes the owner for the error others see (e.g. a flow run id and name); host and pid are
    added here. The lease expires `timeout_s` after its last renewal; the heartbeat renews it every
    `heartbeat_s` (a quarter of the timeout by default).
    """

    def __init__(self, store, run: str, holder: dict[str, Any] | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, heartbeat_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.store, self.run = store, run
        self.uri = lease_uri(store, run)
        self.holder = {**(holder or {}), **this_process()}
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s if heartbeat_s is not None else timeout_s / 4)
        self.token: str | None = None
        self.lost: str | None = None  # why the heartbeat found the lease gone, if it did
        self._acquired_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _document(self, now: float) -> bytes:
        return json.dumps({
            "run": self.run, "token": self.token, "holder": self.holder, "acquired_at": self._acquired_at,
            "renewed_at": now, "expires_at": now + self.timeout_s, "timeout_s": self.timeout_s,
            "heartbeat_s": self.heartbeat_s,
        }, indent=2, sort_keys=True).encode()

    def acquire(self) -> "RunLease":
        """Take the run's lease (a free, expired or dead-owner one), or raise LeaseHeld naming the holder."""
        if self.token is not None:
            raise LeaseError(f"{self.uri} is already held by this RunLease")
        token = uuid.uuid4().hex
        for _ in range(5):
            self.token, self._acquired_at = token, time.time()
            data = self._document(self._acquired_at)
            if self.store.create_exclusive(self.uri, data):
                break
            current = read_lease(self.store, self.run)
            if current is None:
                continue  # released between our two calls: try to create again
            lease, version = current
            if lease.get("token") == token:
                # Our create went through but its response was lost (a dropped connection); the client's retry
                # was then refused because the lease exists: it is this very lease.
                log.info("the lease on %s was created by this holder (the answer to its create was lost)",
                         self.store.run_uri(self.run))
                break
            if is_live(lease):
                self.token = None
                raise LeaseHeld(self.store.run_uri(self.run), lease)
            if self.store.replace_if(self.uri, data, version):
                reason = "its process is gone" if holder_is_gone(lease) else "it expired"
                log.warning("took over the lease on %s (%s): %s", self.store.run_uri(self.run), reason,
                            describe(lease) if lease.get("holder") else "unreadable lease")
                break
        else:
            self.token = None
            raise LeaseError(f"could not take the lease {self.uri}: it changed under every attempt")
        self._start_heartbeat()
        return self

    def renew(self) -> bool:
        """Push the expiry forward; False (and `lost` set) when the lease is no longer this holder's."""
        with self._lock:
            if self.token is None or self.lost:
                return False
            current = read_lease(self.store, self.run)
            if current is None or current[0].get("token") != self.token:
                self.lost = (f"the lease on {self.store.run_uri(self.run)} was "
                             + (f"taken over: {describe(current[0])}" if current else "deleted"))
                log.error("%s; this run's writers stop at their next write", self.lost)
                return False
            if self.store.replace_if(self.uri, self._document(time.time()), current[1]):
                return True
            current = read_lease(self.store, self.run)
            if current is None or current[0].get("token") != self.token:
                self.lost = f"the lease on {self.store.run_uri(self.run)} changed hands during renewal"
                log.error("%s", self.lost)
            return False

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.token is None:
                return
            current = read_lease(self.store, self.run)
            if current is not None and current[0].get("token") == self.token:
                if not self.store.delete_if(self.uri, current[1]):
                    log.warning("the lease on %s changed while it was released", self.store.run_uri(self.run))
            self.token = None

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self.renew() and self.lost:
                        return
                except Exception:  # a network hiccup: the next beat tries again, well before expiry
                    log.warning("renewing the lease on %s failed", self.store.run_uri(self.run), exc_info=True)

        self._thread = threading.Thread(target=beat, name=f"lease-{self.run}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
