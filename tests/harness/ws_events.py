"""A bare websocket client of a test ComfyServer (no page): it keeps the JSON events the server sends and counts
every frame by type (count, bytes), on its own thread. Tests read the pack's events from it; the panel benchmark
counts what a connected client receives per step."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import defaultdict
from typing import Any

BINARY = "(binary: node text or preview)"  # ComfyUI sends progress text and preview images as binary frames


class EventListener:
    """Connected between `with` and its end; `events` holds (type, data) of every JSON frame, in order."""

    def __init__(self, url: str) -> None:
        self.client_id = uuid.uuid4().hex
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.frames: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.events: list[tuple[str, Any]] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EventListener:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"no websocket connection to {self.url}: {self._error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def of_type(self, prefix: str) -> list[tuple[str, Any]]:
        """The events whose type starts with `prefix`, in the order they arrived."""
        return [(t, d) for t, d in list(self.events) if t.startswith(prefix)]

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as err:  # reported by __enter__ when the connection never came up
            self._error = err
            raise

    def _count(self, msg) -> None:
        import aiohttp

        if msg.type == aiohttp.WSMsgType.BINARY:
            entry = self.frames[BINARY]
            entry[0], entry[1] = entry[0] + 1, entry[1] + len(msg.data)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            parsed = json.loads(msg.data)
            kind = parsed.get("type", "(untyped)")
            self.events.append((kind, parsed.get("data")))
            entry = self.frames[kind]
            entry[0], entry[1] = entry[0] + 1, entry[1] + len(msg.data.encode())

    async def _listen(self) -> None:
        import aiohttp

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self._ready.set()
            stop = asyncio.ensure_future(self._stop.wait())
            while not stop.done():
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if receive.done():
                    msg = receive.result()
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                    self._count(msg)
                else:
                    receive.cancel()
