"""Dynamic micro-batching: concurrent predictions share one model call.

Requests decode their images in parallel, then `submit` them. One dispatcher task on the event
loop takes queued images as soon as a model slot (`workers`) is free, up to `max_batch_size`
per call. Under load the queue fills while the model runs, so batches grow with the number
of concurrent requests. When the model is idle and other requests are still decoding, the
dispatcher waits for them, up to `max_wait_s` after the oldest queued image arrived. When no
request is decoding, it runs at once, so a lone request never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio.to_thread

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Reservation:
    """Items counted as being prepared, until `MicroBatcher.submit` queues them."""

    count: int


class BatcherStoppedError(RuntimeError):
    """The batcher stopped before the submitted item ran."""


class MicroBatcher(Generic[Item, Result]):
    """Run `run_batch` on groups of submitted items, in a worker thread.

    Args:
        run_batch: Blocking function from a list of items to one result per item, in order.
        max_batch_size: Maximum number of items in one call.
        max_wait_s: Maximum time, in seconds, that the oldest queued item waits for requests
            that are still being prepared, once a model slot is free.
        workers: Calls of `run_batch` that may run at the same time.
        on_batch: Called on the event loop after each call with the batch size and its
            duration in seconds.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result]],
        max_batch_size: int,
        max_wait_s: float,
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} is invalid; use 1 or more")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s={max_wait_s} is invalid; use 0 or more")
        if workers < 1:
            raise ValueError(f"workers={workers} is invalid; use 1 or more")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.workers = workers
        self.on_batch = on_batch
        self._queue: deque[_Pending[Item]] = deque()
        self._preparing = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(workers)
        self._dispatcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        """Start the dispatcher task on the running event loop."""
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def stop(self) -> None:
        """Stop the dispatcher, wait for running batches, and fail the items still queued."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(BatcherStoppedError("the server is shutting down"))

    @contextlib.contextmanager
    def preparing(self, count: int = 1) -> Iterator[Reservation]:
        """Count `count` items as being prepared until they are submitted or the block exits.

        The dispatcher waits up to `max_wait_s` for such items before it runs a partial batch.
        Pass the yielded reservation to `submit`, which releases it when the items are queued.
        """
        reservation = Reservation(count)
        self._preparing += count
        try:
            yield reservation
        finally:
            self._release(reservation)

    async def submit(
        self, items: Sequence[Item], reservation: Reservation | None = None
    ) -> list[Result]:
        """Queue `items` and return their results, in order, once their batches have run.

        Queueing the items and releasing `reservation` happen in one step, so the dispatcher
        never counts the items as neither being prepared nor queued.

        Raises:
            BatcherStoppedError: The batcher is not running, or stopped before the items ran.
            Exception: Whatever `run_batch` raised for a batch that held one of the items.
        """
        if self._dispatcher is None or self._dispatcher.done():
            raise BatcherStoppedError("the batcher is not running")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future = loop.create_future()
            self._queue.append(_Pending(item, future))
            futures.append(future)
        if reservation is not None:
            self._release(reservation)
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    def _release(self, reservation: Reservation) -> None:
        if reservation.count:
            self._preparing -= reservation.count
            reservation.count = 0
            self._wakeup.set()

    async def _dispatch(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()
            try:
                await self._wait_for_preparing()
                dequeued = [
                    self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))
                ]
            except BaseException:
                self._slots.release()
                raise
            # A request cancelled while queued (its client went away) has a done future.
            batch = [pending for pending in dequeued if not pending.future.done()]
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_preparing(self) -> None:
        """Wait while the batch is not full and items are still being prepared."""
        deadline = self._queue[0].enqueued + self.max_wait_s
        while len(self._queue) < self.max_batch_size and self._preparing > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _run(self, batch: list[_Pending[Item]]) -> None:
        try:
            started = time.perf_counter()
            try:
                results = await anyio.to_thread.run_sync(
                    self.run_batch, [pending.item for pending in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"run_batch returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                return
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
        finally:
            self._slots.release()
