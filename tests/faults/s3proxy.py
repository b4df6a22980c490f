"""A fault proxy on loopback in front of the S3 server: relays HTTP/1.1 as bytes, and answers the PUT requests
a schedule names with a 503 (SlowDown), drops their connection halfway through the request body, or loses the
server's response.

    proxy = FaultProxy(upstream_url, schedule={2: "503", 4: "drop"})   # the 2nd and 4th PUT (1-based)
    ArtifactStore("s3://bucket/prefix", endpoint_url=proxy.url)

A "503" or "drop" request never reaches the server (a 503 is the proxy's own answer; a dropped request is cut
before it was forwarded). A "lose-response" request does: the server carries it out and answers, and the proxy
resets the client's connection instead of relaying that answer. `proxy.puts` lists every PUT seen (path, fault
or None), retries included.
"""

import socket
import struct
import threading
from urllib.parse import urlsplit

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, schedule: dict[int, str] | None = None, only=lambda path: True):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.schedule = dict(schedule or {})  # PUT number (1-based, counting only PUTs `only` accepts) -> fault
        self.only = only
        self.puts: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def injected(self) -> list[tuple[str, str]]:
        return [(path, fault) for path, fault in self.puts if fault]

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault_for(self, method: str, path: str) -> str | None:
        if method != "PUT" or not self.only(path):
            return None
        with self.lock:
            fault = self.schedule.get(len(self.puts) + 1)
            self.puts.append((path, fault))
        return fault

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        reader = client.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                request_line, headers = _parse(head)
                method, path = request_line.split(" ")[:2]
                fault = self._fault_for(method, path)
                length = int(headers.get("content-length", 0))
                expects = headers.get("expect", "").lower() == "100-continue"
                if fault == "503":
                    if not expects:
                        reader.read(length)  # the whole request, then the error: a clean 503
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(SLOW_DOWN), SLOW_DOWN))
                    return
                if fault == "drop":
                    if expects:
                        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    reader.read(length // 2)  # half the body, then a reset: nothing reached the server
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if fault == "lose-response":
                    # On a connection of its own, so the server's answer can be read here and not relayed; the
                    # proxy says 100 Continue itself, so the server's one answer is the final response.
                    if expects:
                        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    with socket.create_connection(self.upstream) as aside:
                        aside.sendall(b"".join(line for line in head.splitlines(keepends=True)
                                               if not line.lower().startswith(b"expect:")))
                        _relay_body(reader, headers, aside)
                        _read_response(aside.makefile("rb"))  # the server has carried the request out
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                upstream.sendall(head)
                if not _relay_body(reader, headers, upstream):
                    return
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass


def _read_head(reader) -> bytes | None:
    lines = []
    while True:
        line = reader.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse(head: bytes) -> tuple[str, dict[str, str]]:
    request_line, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return request_line, headers


def _relay_body(reader, headers: dict[str, str], upstream: socket.socket) -> bool:
    """The request's body to the server; False when the client hung up before sending all of it."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        _relay_chunked(reader, upstream)
        return True
    remaining = int(headers.get("content-length", 0))
    while remaining:
        block = reader.read(min(remaining, 1 << 16))
        if not block:
            return False
        upstream.sendall(block)
        remaining -= len(block)
    return True


def _read_response(reader) -> None:
    """One whole response (head and a Content-Length body) from the server."""
    head = _read_head(reader)
    if head is not None:
        reader.read(int(_parse(head)[1].get("content-length", 0)))


def _relay_chunked(reader, upstream: socket.socket) -> None:
    while True:
        size_line = reader.readline()
        upstream.sendall(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                line = reader.readline()
                upstream.sendall(line)
                if line in (b"\r\n", b"\n", b""):
                    return
        upstream.sendall(reader.read(size + 2))


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """The server's answers, byte for byte, to the client."""
    try:
        while block := source.recv(1 << 16):
            sink.sendall(block)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
