"""A fault-injecting HTTP proxy on loopback, in front of an S3 server (moto_server) for tests.

Clients (pyarrow, boto3, Ray Train, Ray Data) talk to the proxy as they would to S3: it reads each
HTTP/1.1 request, forwards it to the server on a connection of its own and relays the response.
A test switches faults on and off while clients run:

    proxy.stall(60, path=r"/stage1-finetune/checkpoint_")  # the first matching request starts a 60 s
                                                            # freeze: every request is held until it ends
    proxy.refuse(30)                    # nothing listens for 30 s; open connections are reset
    proxy.slow_down(0.2, seed=0)        # 503 SlowDown (S3's XML error) for 20% of requests, seeded
    proxy.cut(path=r"\\.json$")          # the next matching response is cut short, the connection closed
    proxy.clear()                       # back to passing everything through

A fault with `method` (a regex matched against the whole method, e.g. "PUT|POST") and/or `path` (a
regex searched in the request target) waits, armed, for its first matching request, so a test can
aim it at one phase of a run (GET of images while decoding, PUT of checkpoint files, PUT of
metrics.jsonl, PUT of summary.json); `fault.fired` is set when it fires, `fault.wait_over(timeout)`
waits until a stall or refusal has ended. `requests` records (time, method, target, what the proxy
did) for every request; `seen(method, path)` counts the matching ones.

This is a real TCP server with a thread per connection, not a mock of any client library.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId></Error>"
)
IDLE_TIMEOUT_S = 600  # a client connection with no request for this long is closed


@dataclass
class Fault:
    kind: str  # stall | refuse | slow_down | cut
    seconds: float = 0.0
    method: str | None = None
    path: str | None = None
    only_matching: bool = False  # stall: hold only matching requests (default: every request, a frozen server)
    rate: float = 0.0
    times: int = 1  # cut: how many responses
    rng: random.Random | None = None
    fired_at: float | None = None
    ends_at: float | None = None
    count: int = 0  # requests this fault acted on
    fired: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)  # set by clear(): held requests go on

    def matches(self, method: str, target: str) -> bool:
        return ((self.method is None or re.fullmatch(self.method, method) is not None)
                and (self.path is None or re.search(self.path, target) is not None))

    def wait_over(self, timeout: float) -> bool:
        """Wait until a fired stall or refusal has ended; False after `timeout` s."""
        deadline = time.monotonic() + timeout
        if not self.fired.wait(timeout):
            return False
        while time.monotonic() < min(deadline, self.ends_at):
            if self.released.wait(min(deadline, self.ends_at) - time.monotonic()):
                return True
        return time.monotonic() >= self.ends_at


class _Closed(Exception):
    pass


def _read_line(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[: i + 2])
            del buf[: i + 2]
            return line
        chunk = sock.recv(65536)
        if not chunk:
            raise _Closed()
        buf += chunk


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(max(65536, n - len(buf)))
        if not chunk:
            raise _Closed()
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_head(sock: socket.socket, buf: bytearray) -> tuple[str, list[tuple[str, str]]]:
    """(start line, headers) of one HTTP message."""
    start = _read_line(sock, buf).decode("latin-1").rstrip("\r\n")
    while not start:  # stray CRLF between messages
        start = _read_line(sock, buf).decode("latin-1").rstrip("\r\n")
    headers = []
    while True:
        line = _read_line(sock, buf).decode("latin-1").rstrip("\r\n")
        if not line:
            return start, headers
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _read_body(sock: socket.socket, buf: bytearray, headers: list[tuple[str, str]], to_eof: bool) -> bytes:
    """The message body, raw (chunked framing kept), by Transfer-Encoding, Content-Length or EOF."""
    if "chunked" in (_header(headers, "transfer-encoding") or "").lower():
        out = bytearray()
        while True:
            line = _read_line(sock, buf)
            out += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = _read_line(sock, buf)
                    out += trailer
                    if trailer == b"\r\n":
                        return bytes(out)
            out += _read_exact(sock, buf, size + 2)
    length = _header(headers, "content-length")
    if length is not None:
        return _read_exact(sock, buf, int(length))
    if not to_eof:
        return b""
    out = bytearray(buf)
    buf.clear()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def _head_bytes(start: str, headers: list[tuple[str, str]]) -> bytes:
    return (start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode("latin-1")


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST, as a server that went away does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class FaultProxy:
    def __init__(self, upstream_port: int, port: int = 0, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.faults: list[Fault] = []
        self.requests: list[tuple[float, str, str, str]] = []
        self._lock = threading.RLock()  # _decide fires a refusal, which resets clients, under it
        self._listener: socket.socket | None = None
        self._clients: set[socket.socket] = set()
        self._stopped = False
        self._listening = threading.Event()

    # ------------------------------------------------------------------ life cycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._listen()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._close_listener()
        self._reset_clients()

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self._listener = s
        self._listening.set()
        threading.Thread(target=self._accept_loop, args=(s,), daemon=True, name="fault-proxy-accept").start()

    def _close_listener(self) -> None:
        self._listening.clear()
        s, self._listener = self._listener, None
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
            except OSError:
                pass
            s.close()

    def _reset_clients(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for c in clients:
            _reset(c)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="fault-proxy-conn").start()

    # ------------------------------------------------------------------ faults

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        if fault.method is None and fault.path is None and fault.kind in ("stall", "refuse"):
            self._fire(fault, time.monotonic())
        return fault

    def stall(self, seconds: float, method: str | None = None, path: str | None = None,
              only_matching: bool = False) -> Fault:
        """From the first request matching method/path (now, when neither is given) for `seconds`:
        hold every request (or only matching ones) until the stall ends, then forward it."""
        return self._add(Fault("stall", seconds=seconds, method=method, path=path, only_matching=only_matching))

    def refuse(self, seconds: float, method: str | None = None, path: str | None = None) -> Fault:
        """From the first matching request (now, when no pattern is given) for `seconds`: the port
        refuses connections and every open connection is reset."""
        return self._add(Fault("refuse", seconds=seconds, method=method, path=path))

    def slow_down(self, rate: float, seed: int = 0, method: str | None = None, path: str | None = None) -> Fault:
        """Answer 503 SlowDown to a fraction `rate` of the matching requests (seeded), until cleared."""
        return self._add(Fault("slow_down", rate=rate, method=method, path=path, rng=random.Random(seed)))

    def cut(self, method: str | None = None, path: str | None = None, times: int = 1) -> Fault:
        """The next `times` matching responses: half the body, then the connection is closed."""
        return self._add(Fault("cut", method=method, path=path, times=times))

    def clear(self) -> None:
        """Every fault off: held requests go on at once; a refusal in progress still ends on time."""
        with self._lock:
            faults, self.faults = self.faults, []
        for f in faults:
            f.released.set()
        self._listening.wait(120)

    def remove(self, fault: Fault) -> None:
        """One fault off (requests it holds go on)."""
        with self._lock:
            if fault in self.faults:
                self.faults.remove(fault)
        fault.released.set()

    def seen(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests so far matched `method` and `path` (regexes, as for faults)."""
        probe = Fault("probe", method=method, path=path)
        return sum(1 for _, m, target, _ in list(self.requests) if probe.matches(m, target))

    def _fire(self, fault: Fault, now: float) -> None:
        fault.fired_at, fault.ends_at = now, now + fault.seconds
        fault.fired.set()
        if fault.kind == "refuse":
            self._close_listener()
            self._reset_clients()
            threading.Timer(fault.seconds, self._reopen).start()

    def _reopen(self) -> None:
        if not self._stopped:
            self._listen()

    def _decide(self, method: str, target: str) -> tuple[str, list[Fault]]:
        """What to do with a request: ("forward"|"hold"|"refuse"|"slow_down"|"cut", the stalls holding it)."""
        now = time.monotonic()
        holding = []
        with self._lock:
            for f in self.faults:
                matches = f.matches(method, target)
                if f.kind in ("stall", "refuse"):
                    if f.fired_at is None:
                        if not matches:
                            continue
                        self._fire(f, now)
                        if f.kind == "refuse":
                            return "refuse", []
                    if f.kind == "stall" and now < f.ends_at and (matches or not f.only_matching):
                        f.count += 1
                        holding.append(f)
                elif f.kind == "slow_down" and matches and f.rng.random() < f.rate:
                    f.count += 1
                    return "slow_down", []
                elif f.kind == "cut" and matches and f.count < f.times:
                    f.count += 1
                    return "cut", []
        return ("hold", holding) if holding else ("forward", [])

    # ------------------------------------------------------------------ one client connection

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        conn.settimeout(IDLE_TIMEOUT_S)
        try:
            while True:
                start, headers = _read_head(conn, buf)
                method, target = start.split(" ", 2)[:2]
                action, holding = self._decide(method, target)
                self.requests.append((time.time(), method, target, action))
                if action == "refuse":
                    _reset(conn)
                    return
                for f in holding:  # until each stall ends or is cleared
                    f.released.wait(max(0.0, f.ends_at - time.monotonic()))
                expects = (_header(headers, "expect") or "").lower() == "100-continue"
                headers = [(k, v) for k, v in headers if k.lower() not in ("expect", "connection")]
                if action == "slow_down" and expects:  # answer before the body, as S3 does, and hang up
                    conn.sendall(self._slow_down_response(method, close=True))
                    return
                if expects:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(conn, buf, headers, to_eof=False)
                if action == "slow_down":
                    conn.sendall(self._slow_down_response(method, close=False))
                    continue
                head, resp_body, close = self._forward(method, start, headers, body)
                if action == "cut":
                    conn.sendall(head + resp_body[: len(resp_body) // 2])
                    _reset(conn)
                    return
                conn.sendall(head + resp_body)
                if close:
                    return
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._clients.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _slow_down_response(self, method: str, close: bool) -> bytes:
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(SLOW_DOWN_BODY))),
                   ("x-amz-request-id", "FAULTPROXY")]
        if close:
            headers.append(("Connection", "close"))
        return _head_bytes("HTTP/1.1 503 Slow Down", headers) + (b"" if method == "HEAD" else SLOW_DOWN_BODY)

    def _forward(self, method: str, start: str, headers: list[tuple[str, str]], body: bytes) -> tuple[bytes, bytes, bool]:
        """Send one request upstream on a fresh connection: (response head, body, close the client's)."""
        with socket.create_connection(self.upstream, timeout=IDLE_TIMEOUT_S) as up:
            up.sendall(_head_bytes(start, headers + [("Connection", "close")]) + body)
            ubuf = bytearray()
            status, rheaders = _read_head(up, ubuf)
            while status.split(" ")[1].startswith("1"):  # interim responses
                status, rheaders = _read_head(up, ubuf)
            code = int(status.split(" ")[1])
            framed = _header(rheaders, "content-length") is not None or "chunked" in (
                _header(rheaders, "transfer-encoding") or "").lower()
            if method == "HEAD" or code in (204, 304):
                rbody, framed = b"", True
            else:
                rbody = _read_body(up, ubuf, rheaders, to_eof=True)
        rheaders = [(k, v) for k, v in rheaders if k.lower() != "connection"]
        if not framed:
            rheaders.append(("Connection", "close"))
        return _head_bytes(status, rheaders), rbody, not framed
