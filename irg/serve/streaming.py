"""Pacing of a server-sent event stream: keep-alive comments while nothing happens, and a deadline that
holds even then.

A stream may wait long for its first event (a busy replica, a cold start, a long think before any
step): proxies and load balancers close a connection that is silent for a minute or so, and a
deadline checked only when an event arrives never fires while none does. :func:`paced` waits on the
source with a timeout instead, so the ingress writes an SSE comment line (:data:`KEEP_ALIVE`, which
clients skip) every ``keep_alive_s`` of silence and ends the stream at its deadline. No Ray here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

Item = TypeVar("Item")
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: EventSource and every SSE parser ignore it


class StreamTimeout(Exception):
    """The stream ran past its deadline."""

    def __init__(self, timeout_s: float):
        super().__init__(f"generation took over {timeout_s:g} s")
        self.timeout_s = timeout_s


async def paced(source: AsyncIterable[Item], keep_alive_s: float, timeout_s: float) -> AsyncIterator[Item | None]:
    """The items of ``source``, and None after every ``keep_alive_s`` without one; raises
    :class:`StreamTimeout` once ``timeout_s`` have passed since the start, whether or not items come.
    The pending read of ``source`` is cancelled when the caller stops early."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    items = aiter(source)
    pending: asyncio.Future | None = None
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise StreamTimeout(timeout_s)
            if pending is None:
                pending = asyncio.ensure_future(anext(items))
            done, _ = await asyncio.wait({pending}, timeout=min(keep_alive_s, left))
            if not done:
                if loop.time() < deadline:
                    yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()
