"""Requests that arrive together, answered by one call: a model labels a batch of 32 images in
little more time than one, so serve.py gathers the images of concurrent requests into one
batch instead of calling the model once per request.

    batcher = Batcher(label_batch, max_batch=32, wait_s=0.005)
    await batcher.start()          # in the server's event loop
    result = await batcher.submit(item)
    await batcher.stop()

label_batch(items) runs in one worker thread of its own, so the event loop goes on accepting
and decoding requests while the model works, and the model is never called from two threads.
A batch is whatever has queued up while the previous one ran, up to max_batch items; when
fewer are waiting, the first item waits at most wait_s for others to join it.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor


class Batcher:
    """Gathers the items submitted from concurrent tasks into lists of at most max_batch, and
    hands each list to work(items), which returns one result per item, in order."""

    def __init__(self, work, max_batch, wait_s):
        self.work, self.max_batch, self.wait_s = work, max_batch, wait_s
        self._queue = None
        self._task = None
        self._worker = None

    async def start(self):
        self._queue = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._task = asyncio.create_task(self._serve_batches())

    async def stop(self):
        """Stop taking batches; the batch in the worker, if any, is left to finish."""
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._worker.shutdown(wait=True)

    async def submit(self, item):
        """work's result for item, once the batch it joined has been worked on; work's
        exception, if it raised one."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _serve_batches(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            # A client that went away while its item waited needs no answer.
            batch = [(item, future) for item, future in batch if not future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._worker, self.work,
                                                     [item for item, _ in batch])
            except Exception as error:  # the requests of this batch fail, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
