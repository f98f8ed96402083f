"""A small asyncio TCP proxy with latency per direction, for the fault campaign.

One process serves several *routes*. A route listens on an address of one network
namespace and connects to an address of another (``None``: the namespace the proxy runs
in): the campaign uses it to reach the machine's PostgreSQL on 127.0.0.1:5432 from the
services namespace, and to put each host's Redis traffic through a path whose delay it
can change while connections are open (the kernel has no netem). Sockets belong to the
namespace they were created in, so the proxy creates each listening socket and each
upstream socket inside the right namespace (``netns.socket_in``) and needs no thread per
namespace.

Data is relayed in order; a chunk read at time *t* is written at *t + delay* of its
direction (never before an earlier chunk), so a delay change applies to the bytes read
after it. A control socket (a Unix socket path, reachable from every network namespace)
takes one JSON object per line and answers one::

    {"op": "ping"}
    {"op": "delay", "route": "redis-h2", "up": 0.1, "down": 0.1}   # seconds
    {"op": "drop", "route": "redis-h2"}        # close the route's open connections
    {"op": "stats"}

Run as ``python -m tests.faults.proxy --control PATH --routes JSON``; ``ProxyProcess``
starts it and ``ProxyControl`` talks to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.faults.netns import PARENT_ENV, die_with_parent, socket_in

#: Bytes read per chunk; small enough that latency applies to each Redis reply.
CHUNK = 65536

#: Seconds to connect upstream before the client connection is closed.
CONNECT_TIMEOUT = 2.0


@dataclass
class RouteSpec:
    """Where a route listens and where it connects (namespace ``None``: the proxy's own)."""

    name: str
    listen: tuple[str, int]
    connect: tuple[str, int]
    listen_netns: str | None = None
    connect_netns: str | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RouteSpec:
        return cls(
            name=raw["name"],
            listen=(raw["listen"][0], int(raw["listen"][1])),
            connect=(raw["connect"][0], int(raw["connect"][1])),
            listen_netns=raw.get("listen_netns"),
            connect_netns=raw.get("connect_netns"),
        )


@dataclass(eq=False)
class Route:
    """A route's live state: its current delays and open connections."""

    spec: RouteSpec
    up: float = 0.0  # client -> server delay, seconds
    down: float = 0.0  # server -> client delay, seconds
    accepted: int = 0
    failed_upstream: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    def stats(self) -> dict[str, Any]:
        return {
            "up": self.up,
            "down": self.down,
            "accepted": self.accepted,
            "failed_upstream": self.failed_upstream,
            "open": len(self.connections),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, route: Route, direction: str
) -> bool:
    """Copy ``reader`` to ``writer``, each chunk held back by the direction's current delay.

    Returns ``True`` when the stream ended with a clean EOF (passed on as a half-close),
    ``False`` when a side failed (reset, broken pipe).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def drain() -> None:
        while True:
            release_at, data = await queue.get()
            wait = release_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    draining = asyncio.ensure_future(drain())
    try:
        last = 0.0
        while True:
            data = await reader.read(CHUNK)
            delay = route.up if direction == "up" else route.down
            # Never before an earlier chunk: a lowered delay must not reorder the stream.
            last = max(last, loop.time() + delay)
            await queue.put((last, data))
            if not data:
                break
            if direction == "up":
                route.bytes_up += len(data)
            else:
                route.bytes_down += len(data)
        await draining
        return True
    except (OSError, ConnectionError):
        return False
    finally:
        draining.cancel()


async def _serve_connection(
    route: Route, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
) -> None:
    loop = asyncio.get_running_loop()
    route.accepted += 1
    upstream = socket_in(route.spec.connect_netns)
    upstream.setblocking(False)
    server_writer: asyncio.StreamWriter | None = None
    relays: list[asyncio.Task[bool]] = []
    try:
        try:
            await asyncio.wait_for(loop.sock_connect(upstream, route.spec.connect), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            route.failed_upstream += 1
            upstream.close()
            return  # the client sees its connection closed, as if the server were down
        server_reader, server_writer = await asyncio.open_connection(sock=upstream)
        relays = [
            asyncio.ensure_future(_relay(client_reader, server_writer, route, "up")),
            asyncio.ensure_future(_relay(server_reader, client_writer, route, "down")),
        ]
        done, pending = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
        if pending and all(task.result() for task in done):
            await asyncio.wait(pending)  # a clean half-close: let the other direction finish
    finally:
        # Also on a "drop" (this task cancelled): nothing of the connection survives.
        for task in relays:
            task.cancel()
        for writer in (client_writer, server_writer):
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError, asyncio.CancelledError):
                    await writer.wait_closed()


class Proxy:
    """The routes and the control socket of one proxy process."""

    def __init__(self, specs: Sequence[RouteSpec], control_path: Path) -> None:
        self.routes = {spec.name: Route(spec) for spec in specs}
        self.control_path = control_path
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        for route in self.routes.values():
            sock = socket_in(route.spec.listen_netns)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(route.spec.listen)
            sock.listen(128)
            sock.setblocking(False)
            self._servers.append(await asyncio.start_server(self._handler(route), sock=sock))
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        self._servers.append(await asyncio.start_unix_server(self._control, path=str(self.control_path)))

    def _handler(self, route: Route) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            route.connections.add(task)
            try:
                await _serve_connection(route, reader, writer)
            except asyncio.CancelledError:
                pass  # a "drop" (or shutdown): the connection is closed, the task just ends
            finally:
                route.connections.discard(task)

        return handle

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = self.command(json.loads(line))
                except (KeyError, ValueError, TypeError) as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "stats":
            return {"ok": True, "routes": {name: r.stats() for name, r in self.routes.items()}}
        route = self.routes[request["route"]]
        if op == "delay":
            route.up, route.down = float(request["up"]), float(request["down"])
            return {"ok": True}
        if op == "drop":
            for task in list(route.connections):
                task.cancel()
            return {"ok": True, "dropped": len(route.connections)}
        raise ValueError(f"unknown op {op!r}")


async def _main(specs: list[RouteSpec], control_path: Path) -> None:
    proxy = Proxy(specs, control_path)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", type=Path, required=True, help="Unix socket path of the control channel")
    parser.add_argument("--routes", required=True, help="JSON list of route objects (see RouteSpec)")
    args = parser.parse_args(argv)
    die_with_parent()
    specs = [RouteSpec.from_json(raw) for raw in json.loads(args.routes)]
    asyncio.run(_main(specs, args.control))


# -- the campaign's side ------------------------------------------------------------


class ProxyControl:
    """A client of a proxy's control socket (one request per connection: simple, rare)."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, **request: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(sock.makefile("rb").readline())
        if not reply.get("ok"):
            raise RuntimeError(f"proxy {self.path}: {request} -> {reply}")
        return reply

    def set_delay(self, route: str, up: float, down: float) -> None:
        self.request(op="delay", route=route, up=up, down=down)

    def drop(self, route: str) -> int:
        return int(self.request(op="drop", route=route)["dropped"])

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.request(op="stats")["routes"]


@dataclass
class ProxyProcess:
    """The proxy as a child process (in the caller's namespace; it enters others itself)."""

    routes: list[RouteSpec]
    control_path: Path
    log_path: Path
    cwd: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ProxyControl:
        """Start the proxy; return its control client once it answers ``ping``."""
        command = [
            sys.executable, "-m", "tests.faults.proxy", "--control", str(self.control_path),
            "--routes", json.dumps([asdict(r) for r in self.routes]),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(self.cwd), PARENT_ENV: str(os.getpid())}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        control = ProxyControl(self.control_path)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}; see {self.log_path}")
            try:
                control.request(op="ping")
                return control
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"proxy did not answer within {timeout}s; see {self.log_path}"
                    ) from None
            time.sleep(0.02)  # readiness poll of a starting process; it has no event to wait on

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    main()
