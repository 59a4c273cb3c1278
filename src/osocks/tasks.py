"""Tasks started in the background: kept until they end (the loop holds only a weak reference),
and an error in one logged at once with its traceback, not as "Task exception was never retrieved"
whenever the task happens to be collected."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("osocks")


def start(coro: Coroutine[Any, Any, Any], kept: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
    """Run coro as a task held in `kept` until it ends."""
    task = asyncio.ensure_future(coro)
    kept.add(task)
    task.add_done_callback(lambda done: _ended(done, kept))
    return task


def _ended(task: asyncio.Task[Any], kept: set[asyncio.Task[Any]]) -> None:
    kept.discard(task)
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("%s failed: %s", task.get_coro().__qualname__, error, exc_info=error)  # type: ignore[union-attr]
