"""A cuttable TCP proxy on 127.0.0.1 between the pipeline and the MongoDB wire server.

`MongoCutProxy` parses the client->server wire messages, knows which command each one is, and can
cut every connection at the moment a chosen command goes through (before it, or after the server
answered it but before the answer reaches the pipeline, or by swallowing answers). Threads and
sockets only, every loop bounded, and it stops itself after `max_lifetime` seconds.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bson

OP_MSG, OP_QUERY, OP_COMPRESSED = 2013, 2004, 2012
FORWARD_THEN_CUT = "forward_then_cut"  # the server gets (and applies) the message; its answer never arrives
DROP = "drop"                          # the message never reaches the server; every connection is cut
BLACKHOLE = "blackhole"                # the server gets the message; no answer ever arrives, sockets stay open
DOWN, UP = "down", "up"                # after a cut: refuse every new connection, or proxy them normally again


def command_name(message: bytes) -> str:
    """The command of one complete MongoDB wire message ('find', 'update', 'hello', ...)."""
    try:
        op_code = struct.unpack_from("<i", message, 12)[0]
        if op_code == OP_MSG:
            pos = 20  # header (16) + flagBits (4)
            while pos < len(message):
                kind = message[pos]
                pos += 1
                size = struct.unpack_from("<i", message, pos)[0]
                if kind == 0:
                    body = bson.decode(message[pos : pos + size])
                    return next(iter(body), "?")
                pos += size
            return "?"
        if op_code == OP_QUERY:
            pos = 20
            pos = message.index(b"\x00", pos) + 1 + 8  # collection name, numberToSkip, numberToReturn
            size = struct.unpack_from("<i", message, pos)[0]
            return next(iter(bson.decode(message[pos : pos + size])), "?")
        if op_code == OP_COMPRESSED:
            return "compressed"
        return f"op{op_code}"
    except Exception:  # noqa: BLE001 - a name for the log only
        return "?"


def decode_message(message: bytes) -> dict | None:
    """The command or reply document of an OP_MSG (document sequences merged in as lists), else None."""
    try:
        if struct.unpack_from("<i", message, 12)[0] != OP_MSG:
            return None
        pos, doc = 20, {}
        while pos < len(message):
            kind = message[pos]
            pos += 1
            size = struct.unpack_from("<i", message, pos)[0]
            if kind == 0:
                doc.update(bson.decode(message[pos : pos + size]))
            elif kind == 1:
                end = pos + size
                name_end = message.index(b"\x00", pos + 4)
                name = message[pos + 4 : name_end].decode()
                items, p = [], name_end + 1
                while p < end:
                    n = struct.unpack_from("<i", message, p)[0]
                    items.append(bson.decode(message[p : p + n]))
                    p += n
                doc[name] = items
            else:
                return None
            pos += size
        return doc
    except Exception:  # noqa: BLE001 - checksum flag or an odd message: not recorded
        return None


def _frames(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete wire messages at the start of `buffer`, and the rest."""
    out = []
    while len(buffer) >= 4:
        length = struct.unpack_from("<i", buffer, 0)[0]
        if length < 16 or len(buffer) < length:
            break
        out.append(buffer[:length])
        buffer = buffer[length:]
    return out, buffer


@dataclass(frozen=True)
class CutRule:
    """Cut when the `nth` message with command `command` goes through, in `mode`.

    `after` = (command, n): only count `command` messages seen after the n-th `after` command
    (e.g. the first `find` after the first `update` is the read-back of a write).
    """

    command: str
    nth: int = 1
    mode: str = FORWARD_THEN_CUT
    after: tuple[str, int] | None = None


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket):
        self.client = client
        self.server = server
        self.swallow = False          # drop server->client bytes from now on
        self.answered = threading.Event()  # set when a swallowed answer arrived from the server

    def close(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


class MongoCutProxy:
    """A cuttable TCP proxy for the MongoDB wire protocol on 127.0.0.1 (see module docstring)."""

    def __init__(self, target_port: int, rule: CutRule | None = None, after_cut: str = DOWN,
                 on_command: Callable[[str, int], None] | None = None, max_lifetime: float = 300.0,
                 record: bool = False, on_request: Callable[[str, dict | None], None] | None = None):
        self.target_port = target_port
        self.record = record
        self.sent: list[dict] = []     # decoded commands (record=True)
        self.replies: list[dict] = []  # decoded replies (record=True)
        self._sent_by_id: dict[tuple[int, int], dict] = {}    # (pair, requestID) -> command
        self._reply_to: list[tuple[dict, dict | None]] = []  # (reply, the command it answers)
        self.rule = rule
        self.after_cut = after_cut
        self.on_command = on_command  # called (in the pump thread) before a message is forwarded
        self.on_request = on_request  # the same, with the decoded command document
        self.deadline = time.monotonic() + max_lifetime
        self.commands: list[str] = []
        self.counts: Counter[str] = Counter()
        self.cut_at: str | None = None   # description of the cut, once it happened
        self.cut_event = threading.Event()
        self._down = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._threads: list[threading.Thread] = []
        self._after_seen = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        self._spawn(self._accept_loop, "proxy-accept")

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self, target: Callable, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def stop(self) -> None:
        self._stop.set()
        self.cut_all()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> MongoCutProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def documents_returned(self, exclude: Callable[[dict], bool] = lambda command: False) -> list[dict]:
        """Every document the server returned in a cursor batch (find / getMore / aggregate), except those
        answering a command for which `exclude(command)` is true (a getMore counts as its find)."""
        with self._lock:
            pairs = list(self._reply_to)
        origin: dict[Any, dict] = {}  # cursor id -> the command that opened it
        docs = []
        for reply, request in pairs:
            cursor = reply.get("cursor")
            if not isinstance(cursor, dict):
                continue
            if request is not None and "getMore" in request:
                request = origin.get(request["getMore"], request)
            if request is not None and cursor.get("id"):
                origin[cursor["id"]] = request
            if request is not None and exclude(request):
                continue
            docs += cursor.get("firstBatch", []) + cursor.get("nextBatch", [])
        return docs

    def commands_sent(self, name: str) -> list[dict]:
        with self._lock:
            return [c for c in self.sent if next(iter(c), None) == name]

    def cut_all(self) -> None:
        """Close every proxied connection now."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def restore(self) -> None:
        """Accept and proxy new connections again."""
        self._down = False

    @property
    def down(self) -> bool:
        return self._down

    # ------------------------------------------------------------------ loops
    def _accept_loop(self) -> None:
        while self._running():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._down:
                client.close()  # the server is "gone": the connection dies at once
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(0.25)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.append(pair)
            self._spawn(self._client_to_server, "proxy-c2s", pair)
            self._spawn(self._server_to_client, "proxy-s2c", pair)
        self.stop_accepting()

    def stop_accepting(self) -> None:
        self._stop.set()
        self.cut_all()

    def _recv(self, sock: socket.socket) -> bytes | None:
        """Bytes, b'' on EOF, None on timeout."""
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None
        except OSError:
            return b""

    def _decide(self, name: str) -> str | None:
        rule = self.rule
        if rule is None or self.cut_at is not None:
            return None
        if rule.after is not None:
            if self.counts[rule.after[0]] < rule.after[1]:
                return None
            if name == rule.command:
                self._after_seen += 1
                if self._after_seen == rule.nth:
                    return rule.mode
            return None
        if name == rule.command and self.counts[name] == rule.nth:
            return rule.mode
        return None

    def _client_to_server(self, pair: _Pair) -> None:
        buffer = b""
        while self._running():
            data = self._recv(pair.client)
            if data is None:
                continue
            if not data:
                break
            buffer += data
            while len(buffer) >= 4:
                length = struct.unpack_from("<i", buffer, 0)[0]
                if length < 16 or length > 64 * 1024 * 1024:
                    pair.close()
                    return
                if len(buffer) < length:
                    break
                message, buffer = buffer[:length], buffer[length:]
                name = command_name(message)
                decoded = decode_message(message) if (self.record or self.on_request) else None
                with self._lock:
                    if decoded is not None:
                        self.sent.append(decoded)
                        self._sent_by_id[(id(pair), struct.unpack_from("<i", message, 4)[0])] = decoded
                    self.commands.append(name)
                    self.counts[name] += 1
                    count = self.counts[name]
                    mode = self._decide(name)
                    if mode is not None:
                        self.cut_at = f"{mode} at {name} #{count}"
                if self.on_command is not None:
                    self.on_command(name, count)
                if self.on_request is not None:
                    self.on_request(name, decoded)
                if mode is None:
                    if not self._send(pair.server, message):
                        pair.close()
                        return
                    continue
                self._cut(pair, message, mode)
                return
        pair.close()

    def _cut(self, pair: _Pair, message: bytes, mode: str) -> None:
        if mode == DROP:
            self._down = self.after_cut == DOWN
            self.cut_all()
        elif mode == FORWARD_THEN_CUT:
            pair.swallow = True
            self._send(pair.server, message)
            pair.answered.wait(timeout=10)  # the server applied it and answered; the answer is lost
            self._down = self.after_cut == DOWN
            self.cut_all()
        elif mode == BLACKHOLE:
            pair.swallow = True
            self._send(pair.server, message)
            pair.answered.wait(timeout=10)
            self._down = self.after_cut == DOWN
            # keep this connection open and silent: the client has to time out on its own
            while self._running() and not self._stop.is_set():
                if self._recv(pair.client) == b"":
                    break
            pair.close()
        self.cut_event.set()

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
            return True
        except OSError:
            return False

    def _server_to_client(self, pair: _Pair) -> None:
        buffer = b""
        while self._running():
            data = self._recv(pair.server)
            if data is None:
                continue
            if not data:
                break
            if self.record:
                messages, buffer = _frames(buffer + data)
                for message in messages:
                    decoded = decode_message(message)
                    if decoded is not None:
                        with self._lock:
                            self.replies.append(decoded)
                            request = self._sent_by_id.get((id(pair), struct.unpack_from("<i", message, 8)[0]))
                            self._reply_to.append((decoded, request))
            if pair.swallow:
                pair.answered.set()
                continue
            if not self._send(pair.client, data):
                break
        pair.close()


def mongo_port(uri: str) -> int:
    """The port of a `mongodb://host:port/...` URI."""
    hostport = uri.split("://", 1)[1].split("/", 1)[0].split("@")[-1]
    return int(hostport.rsplit(":", 1)[1])
