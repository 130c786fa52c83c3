"""A TCP proxy on loopback for the network faults of the truth test.

One thread per proxy runs a selector over the listener and every connection pair; the harness
switches the mode from its own thread (`set_mode`, `refuse`, `slow`), and the loop applies it
before `set_mode` returns, so a fault starts at a known moment. Each mode counts what it did, so
a fault can prove it took effect instead of trusting that it did:

- pass: forward both ways (after `delay` seconds per chunk when slow: `chunks_delayed`).
- stall: stop forwarding, keep the sockets: what arrives is held (`bytes_held`) and sent on
  when the mode goes back to pass, as a network that only paused would.
- blackhole: accept and read, forward nothing, answer nothing (`bytes_dropped`); a connection
  that lost bytes can never be whole again, so it is reset when the black hole ends (as TCP
  would time it out).
- reset: every connection, open or new, is closed with an RST (SO_LINGER 0: `resets`).
- refusing (`refuse(True)`): the listener is closed, so the kernel refuses new connections, and
  the open ones are reset; `refuse(False)` listens again on the same port.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

PASS, STALL, BLACKHOLE, RESET = "pass", "stall", "blackhole", "reset"
MODES = (PASS, STALL, BLACKHOLE, RESET)
CHUNK = 65536
HELD_CAP = 1 << 20  # per direction: past this a stalled socket is no longer read (the kernel's buffers fill)
CONNECT_TIMEOUT = 2.0


class ProxyError(Exception):
    """The proxy could not listen, or its loop is gone."""


def abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class Counters:
    """What the proxy did since it started; a fault reads them before and after to prove itself."""

    accepted: int = 0
    bytes_forwarded: int = 0
    bytes_held: int = 0
    bytes_dropped: int = 0
    chunks_delayed: int = 0
    resets: int = 0
    upstream_refused: int = 0


@dataclass
class _Pair:
    client: socket.socket | None  # None once it closed inside a black hole (its FIN went nowhere)
    upstream: socket.socket | None
    # Per direction: chunks waiting to be sent, each with the time it may go.
    to_upstream: deque[tuple[float, bytes]] = field(default_factory=deque)
    to_client: deque[tuple[float, bytes]] = field(default_factory=deque)
    lost: bool = False  # bytes were dropped: the stream can never be whole again

    def pending(self, sock: socket.socket) -> deque[tuple[float, bytes]]:
        return self.to_upstream if sock is self.upstream else self.to_client

    def incoming(self, sock: socket.socket) -> deque[tuple[float, bytes]]:
        """The queue what sock sends goes to."""
        return self.to_client if sock is self.upstream else self.to_upstream

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]


class Proxy:
    """listen on 127.0.0.1:port (0: a free one), forward to upstream; start() and close()."""

    def __init__(self, upstream: tuple[str, int], port: int = 0, name: str = "proxy") -> None:
        self.upstream = upstream
        self.port = port
        self.name = name
        self.counters = Counters()
        self.mode = PASS
        self.delay = 0.0
        self.refusing = False
        self._pairs: list[_Pair] = []
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._commands: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"chaos-{name}", daemon=True)

    # -- the harness's side ---------------------------------------------------------------

    def start(self) -> "Proxy":
        self._listen()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r} (one of {', '.join(MODES)})")
        self._call(lambda: self._apply_mode(mode))

    def slow(self, delay: float) -> None:
        """Delay every chunk by delay seconds from now on (0: no delay)."""
        self._call(lambda: setattr(self, "delay", max(0.0, delay)))

    def refuse(self, refusing: bool) -> None:
        self._call(lambda: self._apply_refuse(refusing))

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(**vars(self.counters))

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        if self._closed:
            return
        if self._thread.is_alive():
            self._call(self._shutdown)
            self._thread.join(5)
        self._closed = True
        self._wake_w.close()

    # -- the loop's side ------------------------------------------------------------------

    def _call(self, action: Callable[[], None], timeout: float = 10.0) -> None:
        """Run action on the loop's thread and wait until it has run."""
        if not self._thread.is_alive():
            raise ProxyError(f"{self.name}: the proxy's loop is not running")
        done = threading.Event()
        self._commands.append((action, done))
        self._wake_w.send(b"x")
        if not done.wait(timeout):
            raise ProxyError(f"{self.name}: the proxy's loop did not answer within {timeout:g}s")

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError as exc:
            listener.close()
            raise ProxyError(f"{self.name}: cannot listen on 127.0.0.1:{self.port}: {exc}") from None
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "listen")

    def _loop(self) -> None:
        while not self._closed:
            now = time.monotonic()
            self._flush(now)
            self._interest()
            due = [chunks[0][0] for p in self._pairs for chunks in (p.to_upstream, p.to_client) if chunks]
            timeout = None if not due or self.mode != PASS else max(0.0, min(due) - now)
            for key, mask in self._selector.select(timeout):
                if key.data == "wake":
                    self._run_commands()
                elif key.data == "listen":
                    self._accept()
                elif mask & selectors.EVENT_READ and key.fileobj.fileno() != -1:
                    self._read(key.data, key.fileobj)  # type: ignore[arg-type]

    def _run_commands(self) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while self._commands:
            action, done = self._commands.popleft()
            try:
                action()
            finally:
                done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        with self._lock:
            self.counters.accepted += 1
        if self.mode == RESET:
            self._count_reset()
            abort(client)
            return
        upstream = None
        if self.mode != BLACKHOLE:
            try:
                upstream = socket.create_connection(self.upstream, timeout=CONNECT_TIMEOUT)
            except OSError:
                with self._lock:
                    self.counters.upstream_refused += 1
                abort(client)  # as the server would: refused
                return
        pair = _Pair(client, upstream, lost=upstream is None)
        for sock in pair.sockets():
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(sock, selectors.EVENT_READ, pair)
        with self._lock:
            self._pairs.append(pair)

    def _read(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._drop(pair, reset=True)
            return
        if not data:
            self._finish(pair, sock)
            return
        if self.mode == BLACKHOLE or pair.lost:
            pair.lost = True
            with self._lock:
                self.counters.bytes_dropped += len(data)
            return
        if self.mode == STALL:
            with self._lock:
                self.counters.bytes_held += len(data)
        elif self.delay:
            with self._lock:
                self.counters.chunks_delayed += 1
        pair.incoming(sock).append((time.monotonic() + self.delay, data))

    def _flush(self, now: float) -> None:
        """Send every chunk that is due, while passing."""
        if self.mode != PASS:
            return
        for pair in list(self._pairs):
            for sock in pair.sockets():
                chunks = pair.pending(sock)
                while chunks and chunks[0][0] <= now:
                    when, data = chunks[0]
                    try:
                        sent = sock.send(data)
                    except BlockingIOError:
                        break
                    except OSError:
                        self._drop(pair, reset=True)
                        return
                    with self._lock:
                        self.counters.bytes_forwarded += sent
                    if sent < len(data):
                        chunks[0] = (when, data[sent:])
                        break
                    chunks.popleft()

    def _interest(self) -> None:
        """Read a socket unless what it sent is piling up; write one with chunks due."""
        for pair in self._pairs:
            for sock in pair.sockets():
                events = 0
                if sum(len(d) for _, d in pair.incoming(sock)) < HELD_CAP:
                    events |= selectors.EVENT_READ
                if self.mode == PASS and pair.pending(sock) and pair.pending(sock)[0][0] <= time.monotonic():
                    events |= selectors.EVENT_WRITE
                try:
                    if events:
                        self._selector.modify(sock, events, pair)
                    else:
                        self._selector.unregister(sock)
                except KeyError:
                    if events:
                        self._selector.register(sock, events, pair)
                except (ValueError, OSError):
                    pass

    def _finish(self, pair: _Pair, closed: socket.socket) -> None:
        """One side closed: what it sent before is still owed to the other side (a server's last
        error message), unless the proxy is not forwarding; then both are closed."""
        other = pair.client if closed is pair.upstream else pair.upstream
        if other is not None and (self.mode == BLACKHOLE or pair.lost):
            # A black hole drops the FIN too: the other side stays open, knowing nothing, until
            # the black hole ends and resets it (a server's backend lingers as it would).
            self._forget(pair, closed)
            return
        chunks = pair.incoming(closed)
        if other is not None and self.mode == PASS and chunks:
            try:
                other.settimeout(1.0)
                for _, data in chunks:
                    other.sendall(data)
                    with self._lock:
                        self.counters.bytes_forwarded += len(data)
            except OSError:
                pass
        self._drop(pair, reset=False)

    def _forget(self, pair: _Pair, closed: socket.socket) -> None:
        try:
            self._selector.unregister(closed)
        except (KeyError, ValueError):
            pass
        closed.close()
        pair.lost = True
        if closed is pair.client:
            pair.client = None
        else:
            pair.upstream = None

    def _drop(self, pair: _Pair, reset: bool) -> None:
        """Close both ends: with an RST when reset, else as the other side closed."""
        for sock in pair.sockets():
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            if reset:
                abort(sock)
            else:
                sock.close()
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)

    def _count_reset(self) -> None:
        with self._lock:
            self.counters.resets += 1

    def _reset_all(self, only_lost: bool = False) -> None:
        for pair in list(self._pairs):
            if pair.lost or not only_lost:
                self._count_reset()
                self._drop(pair, reset=True)

    def _apply_mode(self, mode: str) -> None:
        leaving_blackhole = self.mode == BLACKHOLE and mode != BLACKHOLE
        self.mode = mode
        if mode == RESET:
            self._reset_all()
        elif leaving_blackhole:
            self._reset_all(only_lost=True)

    def _apply_refuse(self, refusing: bool) -> None:
        if refusing == self.refusing:
            return
        self.refusing = refusing
        if refusing:
            assert self._listener is not None
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            self._reset_all()
        else:
            self._listen()

    def _shutdown(self) -> None:
        self._closed = True
        for pair in list(self._pairs):
            self._drop(pair, reset=False)
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Until predicate() holds (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)

