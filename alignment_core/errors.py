"""Which failures are worth a second try: one table, read by the stage retries and by the judge's HTTP retries.

A transient failure may pass on its own (a timeout, a rate limit, a server error, a dropped connection): a stage
task is retried (tasks.stage_task), a judge request is retried with backoff. A permanent one fails the same way
every time (a refused key, a wrong URL, a full or read-only disk, a missing file): retrying only delays the
error, so it fails at once and its message says what to fix, never to "run again".
"""

import errno
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    transient: bool
    meaning: str  # what the failure says about the setup, for the error message
    fails_every_request: bool = False  # an HTTP status that says the setup is wrong (key, URL), not the request


# ---- the table ---------------------------------------------------------------------------------------------
HTTP_STATUS_FAILURES = {
    400: Failure(False, "the server refused the request as invalid (e.g. a prompt longer than the model takes)"),
    401: Failure(False, "the server refused the credentials: check the API key in the environment variable "
                        "annotation.judge.api_key_env names", fails_every_request=True),
    403: Failure(False, "the credentials are not allowed to use this endpoint or model", fails_every_request=True),
    404: Failure(False, "no such endpoint or model: check annotation.judge.base_url and annotation.judge.model",
                 fails_every_request=True),
    408: Failure(True, "the server timed out waiting for the request"),
    429: Failure(True, "rate limited"),
    500: Failure(True, "server error"),
    502: Failure(True, "bad gateway"),
    503: Failure(True, "the server is unavailable (overloaded or down for maintenance)"),
    504: Failure(True, "gateway timeout"),
}
OS_ERRNO_FAILURES = {
    errno.ENOSPC: Failure(False, "no space left on the device: free space or point the store elsewhere"),
    errno.EACCES: Failure(False, "permission denied: the worker's user may not write or read there"),
    errno.EROFS: Failure(False, "the file system is read-only"),
    errno.ENOENT: Failure(False, "no such file or folder"),
}
TIMEOUT = Failure(True, "no answer in time")
CONNECTION_DROPPED = Failure(True, "the connection failed or was dropped")
WORKER_KILLED = Failure(True, "a worker process died")


def http_status_failure(status: int) -> Failure:
    """The table's entry for an HTTP error status; others by class: 5xx transient, any other error permanent."""
    if status in HTTP_STATUS_FAILURES:
        return HTTP_STATUS_FAILURES[status]
    return Failure(status >= 500, f"HTTP {status}")


def failure_of(error: BaseException) -> Failure | None:
    """The table's entry for an exception, or None when the table does not know it (a bug, a bad config)."""
    import httpx

    if isinstance(error, PermanentError):
        return Failure(False, str(error))
    if isinstance(error, httpx.HTTPStatusError):
        return http_status_failure(error.response.status_code)
    if isinstance(error, (TimeoutError, httpx.TimeoutException)):
        return TIMEOUT
    if isinstance(error, (httpx.TransportError, ConnectionError)):
        return CONNECTION_DROPPED
    if isinstance(error, subprocess.CalledProcessError):
        return WORKER_KILLED
    if isinstance(error, OSError):
        if error.errno in OS_ERRNO_FAILURES:
            return OS_ERRNO_FAILURES[error.errno]
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return Failure(False, type(error).__name__)
        return Failure(True, "an I/O error")  # e.g. EIO from a network file system
    return None


def is_transient(error: BaseException) -> bool:
    """True for failures that may pass on a second try (see the table above); anything it does not know is not."""
    failure = failure_of(error)
    return failure is not None and failure.transient


class PermanentError(RuntimeError):
    """A failure that a retry cannot fix (a refused API key, a wrong endpoint): the stage fails at once."""
