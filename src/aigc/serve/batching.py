"""Dynamic batching: requests for one model are decoded together by a worker thread.

Each text model has a `TextBatcher`: a thread that owns the model's
`aigc.sampling.BatchDecoder` and a bounded queue of waiting requests (`TextJob`).
The event loop submits jobs and reads their results; it never runs the model.

Continuous batching: between two decode steps the worker admits waiting rows
(each prompt x n of a request is one row) while the batch has fewer than
max_batch_size rows, and a row that ends leaves the batch at once, so a long
request never holds up a short one. An idle model waits up to max_wait_ms for
more requests before its first step, so requests that arrive together start
together. A request with more rows than there is room for is admitted row by row.
Results go back to the event loop through `loop.call_soon_threadsafe`, one
call per step for all the jobs it served, in the order the decoder produced
them: each call writes to the loop's wake-up socket and then waits for the GIL,
which per job and step took a large share of the worker's time at 16 rows.

Image models have an `ImageRunner`: one thread per model that generates whole
requests one after another (an image request is already a batch of n).

Diffusion models have a `DiffusionBatcher`: a thread that gathers the requests
(`ImageJob`, each a request the pipeline has prepared) arriving within max_wait of each
other, or while the previous batch ran, and denoises those that share a scheduler and
a step count as one batch of up to max_images images (`DiffusionPipeline.run_batch`:
one network call a step for all of them). Previews (the x_0 estimate of a step) and
the images go back to each request as base64 PNGs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from aigc.sampling import BatchDecoder, DecodeEvent, SamplingParams
from aigc.serve.metrics import ServeMetrics

log = logging.getLogger("aigc.serve")
T = TypeVar("T")


class QueueFull(Exception):
    """The model's queue is full; try again after `retry_after` seconds."""

    def __init__(self, model: str, size: int, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(
            f"model {model!r} has {size} requests waiting, the most its queue holds "
            f"(--queue-size); retry after {retry_after} s"
        )


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


class JobTimeout(Exception):
    """A request did not finish within its time limit."""


@dataclass
class JobFailed:
    """Sent to a job instead of events when its rows could not be decoded (a bug)."""

    message: str


_EXPIRED = object()  # put in a job's queue at its deadline, to wake a waiting reader


@dataclass
class _Stopped:
    """Put in a job's queue when the server ends it before it has finished."""

    message: str


_job_ids = itertools.count()


class TextJob:
    """One request: its rows (prompt ids, parameters), and its results as they come.

    Made and read on the event loop; the worker thread posts to it.
    """

    def __init__(self, rows: list[tuple[list[int], SamplingParams]], stream: bool) -> None:
        self.id = next(_job_ids)
        self.rows = rows
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.created = time.monotonic()
        self._results: asyncio.Queue[list[DecodeEvent] | JobFailed | object] = asyncio.Queue()
        self._open = len(rows)  # rows not yet ended (read on the event loop)
        # owned by the worker thread:
        self.admitted = 0  # rows handed to the decoder
        self.ended = 0  # rows that have ended
        self.started = False  # time to first token observed

    @property
    def done(self) -> bool:
        return self._open == 0

    def post(self, item: list[DecodeEvent] | JobFailed) -> None:
        """From the worker thread: hand results to the event loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self._results.put_nowait, item)

    def stop(self, message: str) -> None:
        """End the job now (on the event loop): its reader gets ShuttingDown(message)."""
        self._results.put_nowait(_Stopped(message))

    async def events(self, deadline: float) -> AsyncIterator[list[DecodeEvent]]:
        """The job's events, until every row has ended: a list per decode step, or the
        lists of all steps that are ready, in order, when the reader fell behind.

        Raises JobTimeout past `deadline` (time.monotonic()), RuntimeError when the
        worker failed, and ShuttingDown when the server stopped the job.
        """
        # one timer for the whole job, not asyncio.wait_for per step: that makes a
        # task and a timer for every token of every row
        timer = self.loop.call_later(
            max(0.0, deadline - time.monotonic()), self._results.put_nowait, _EXPIRED
        )
        try:
            while self._open:
                if time.monotonic() >= deadline:
                    raise JobTimeout
                items = [await self._results.get()]
                # steps that arrived while the reader was busy go out together: under load
                # a reader that lags behind pays its per-write cost once, not per step
                while not self._results.empty():
                    items.append(self._results.get_nowait())
                events: list[DecodeEvent] = []
                for item in items:
                    if item is _EXPIRED:
                        raise JobTimeout
                    if isinstance(item, _Stopped):
                        raise ShuttingDown(item.message)
                    if isinstance(item, JobFailed):
                        self._open = 0
                        raise RuntimeError(item.message)
                    events += item
                self._open -= sum(e.finish_reason is not None for e in events)
                yield events
        finally:
            timer.cancel()


def _post_many(
    loop: asyncio.AbstractEventLoop, deliveries: list[tuple[TextJob, list[DecodeEvent]]]
) -> None:
    """From the worker thread: hand the events of one step to their jobs, in one call."""

    def deliver() -> None:
        for job, events in deliveries:
            job._results.put_nowait(events)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(deliver)


class TextBatcher:
    """The worker thread of one text model (see the module docstring)."""

    def __init__(
        self,
        name: str,
        decoder: BatchDecoder,
        metrics: ServeMetrics,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
    ) -> None:
        self.name = name
        self.decoder = decoder
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self._cond = threading.Condition()
        self._waiting: deque[TextJob] = deque()  # jobs with rows not yet admitted
        self._jobs: dict[int, TextJob] = {}  # jobs with rows in the decoder
        self._cancelled: list[TextJob] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        metrics.queue_depth.labels(name).set_function(lambda: len(self._waiting))
        metrics.running.labels(name).set_function(lambda: self.decoder.running)

    # -- the event loop's side ---------------------------------------------------

    def submit(self, job: TextJob) -> None:
        """Queue a job; QueueFull when queue_size jobs wait already."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown(f"model {self.name!r} is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(self.name, len(self._waiting))
            self._waiting.append(job)
            self._start()
            self._cond.notify()

    def cancel(self, job: TextJob) -> None:
        """Forget a job whose client left or timed out; its rows leave the batch."""
        with self._cond:
            self._cancelled.append(job)
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; jobs still queued or running get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:  # started on first use, so an app that never serves owns none
            self._thread = threading.Thread(
                target=self._run, name=f"aigc-batcher-{self.name}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self.decoder or self._cancelled or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                if not self.decoder and self._waiting and self.max_wait > 0:
                    self._gather()
                self._drop_cancelled()
                started = self._admit()
            if self.decoder:
                self._step(started)
        self._fail_all("the server is shutting down")

    def _gather(self) -> None:
        """An idle model: wait up to max_wait for more rows to batch with (lock held)."""
        deadline = time.monotonic() + self.max_wait
        while not self._stopping:
            rows = sum(len(j.rows) - j.admitted for j in self._waiting)
            left = deadline - time.monotonic()
            if rows >= self.max_batch_size or left <= 0:
                return
            self._cond.wait(left)

    def _drop_cancelled(self) -> None:
        for job in self._cancelled:
            if job in self._waiting:
                self._waiting.remove(job)
            if self._jobs.pop(job.id, None) is not None:
                for i in range(job.admitted):
                    self.decoder.cancel((job.id, i))
        self._cancelled.clear()

    def _admit(self) -> list[TextJob]:
        """Move waiting rows into the decoder while there is room, oldest job first."""
        admitted = []
        while self._waiting and len(self.decoder) < self.max_batch_size:
            job = self._waiting[0]
            while job.admitted < len(job.rows) and len(self.decoder) < self.max_batch_size:
                ids, params = job.rows[job.admitted]
                try:
                    self.decoder.add((job.id, job.admitted), ids, params, stream=job.stream)
                except Exception as e:  # the request was checked before it was queued
                    log.exception("cannot add a row of request %d to %s", job.id, self.name)
                    self._waiting.popleft()
                    self._drop_rows(job)
                    job.post(JobFailed(f"{type(e).__name__}: {e}"))
                    break
                job.admitted += 1
                self._jobs[job.id] = job
                admitted.append(job)
            else:
                if job.admitted == len(job.rows):
                    self._waiting.popleft()
        return admitted

    def _drop_rows(self, job: TextJob) -> None:
        self._jobs.pop(job.id, None)
        for i in range(job.admitted):
            self.decoder.cancel((job.id, i))

    def _step(self, started: list[TextJob]) -> None:
        try:
            events = self.decoder.step()
        except Exception as e:  # a bug: fail the batch, keep serving
            log.exception("decoding failed on %s", self.name)
            self._fail_all(f"decoding failed: {type(e).__name__}: {e}")
            old = self.decoder
            self.decoder = BatchDecoder(old.model, old.tokenizer, old.max_rows)
            return
        now = time.monotonic()
        rows = self.decoder.last_step_rows
        if rows:
            self.metrics.batch_size.labels(self.name).observe(rows)
            self.metrics.tokens.labels(self.name).inc(rows)
        for job in started:
            if not job.started:
                job.started = True
                self.metrics.ttft.labels(self.name).observe(now - job.created)
        by_job: dict[int, list[DecodeEvent]] = {}
        for event in events:
            job_id, choice = event.key
            event.key = choice
            by_job.setdefault(job_id, []).append(event)
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[TextJob, list[DecodeEvent]]]] = {}
        for job_id, job_events in by_job.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            deliveries.setdefault(job.loop, []).append((job, job_events))
            job.ended += sum(e.finish_reason is not None for e in job_events)
            if job.ended == len(job.rows):
                del self._jobs[job_id]
        for loop, items in deliveries.items():
            _post_many(loop, items)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            jobs = list(self._jobs.values()) + [j for j in self._waiting if j.id not in self._jobs]
            self._jobs.clear()
            self._waiting.clear()
        for job in jobs:
            job.post(JobFailed(message))


class ImageRunner:
    """One thread per image model: requests run one after another, at most
    queue_size waiting behind the one running."""

    def __init__(self, name: str, metrics: ServeMetrics, queue_size: int) -> None:
        self.name = name
        self.queue_size = queue_size
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"aigc-images-{name}")
        self._pending = 0  # submitted, not finished (event loop only)
        self._stopping = False
        metrics.queue_depth.labels(name).set_function(lambda: max(0, self._pending - 1))

    async def run(self, fn: Callable[[], T], deadline: float) -> T:
        """fn() on the model's thread; QueueFull, ShuttingDown or JobTimeout."""
        if self._stopping:
            raise ShuttingDown(f"model {self.name!r} is shutting down")
        if self._pending > self.queue_size:
            raise QueueFull(self.name, self._pending - 1)
        self._pending += 1
        future = self._executor.submit(fn)
        try:
            left = max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.wrap_future(future), left)
        except TimeoutError:
            future.cancel()  # if it has not started; a running one finishes unread
            raise JobTimeout from None
        finally:
            self._pending -= 1

    def stop(self) -> None:
        self._stopping = True
        self._executor.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# diffusion


@dataclass
class Preview:
    """Partial images of a diffusion request: the x_0 estimate after `step` of `total`
    scheduler calls, one base64 PNG per image of the request."""

    index: int  # 0, 1, ...: OpenAI's partial_image_index
    step: int
    total: int
    images: list[str]


@dataclass
class Finished:
    """The images of a diffusion request, base64 PNGs."""

    images: list[str]


class ImageJob:
    """One diffusion request, prepared by the pipeline (checked, its noise drawn), and its
    previews and images as they come. Made and read on the event loop; the worker posts."""

    def __init__(self, prepared: Any, partial_images: int = 0) -> None:
        self.prepared = prepared  # aigc.pipelines.diffusion._Prepared
        self.n = prepared.request.n
        self.watermark = prepared.request.watermark  # marks its previews as its images
        self._start((prepared.scheduler, prepared.steps), partial_images)

    def _start(self, key: Any, partial_images: int) -> None:
        self.id = next(_job_ids)
        self.key = key  # what a batch must share
        self.partial_images = partial_images
        self.loop = asyncio.get_running_loop()
        self.created = time.monotonic()
        self._results: asyncio.Queue[Preview | Finished | JobFailed | object] = asyncio.Queue()
        self.done = False  # its images have been read (event loop)
        self.cancelled = False  # its client left or timed out (set by the loop, read by the worker)
        self.previews_sent = 0  # worker thread

    def preview_due(self, step: int, total: int) -> bool:
        """Whether the x_0 estimate after `step` of `total` calls is a preview: k previews
        evenly spread, preview j after call (j + 1) * total // (k + 1), at most one a call,
        none at the last (the images themselves follow)."""
        j = self.previews_sent
        return (
            j < self.partial_images
            and step < total
            and step >= (j + 1) * total // (self.partial_images + 1)
        )

    def post(self, item: Preview | Finished | JobFailed) -> None:
        """From the worker thread: hand a result to the event loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self._results.put_nowait, item)

    def stop(self, message: str) -> None:
        """End the job now (on the event loop): its reader gets ShuttingDown(message)."""
        self._results.put_nowait(_Stopped(message))

    async def events(self, deadline: float) -> AsyncIterator[Preview | Finished]:
        """Its previews, then its images (Finished, the last). Raises JobTimeout past
        `deadline` (time.monotonic()), RuntimeError when the worker failed, and
        ShuttingDown when the server stopped the job."""
        timer = self.loop.call_later(
            max(0.0, deadline - time.monotonic()), self._results.put_nowait, _EXPIRED
        )
        try:
            while not self.done:
                item = await self._results.get()
                if item is _EXPIRED or time.monotonic() >= deadline:
                    raise JobTimeout
                if isinstance(item, _Stopped):
                    raise ShuttingDown(item.message)
                if isinstance(item, JobFailed):
                    raise RuntimeError(item.message)
                assert isinstance(item, Preview | Finished)
                self.done = isinstance(item, Finished)
                yield item
        finally:
            timer.cancel()


class EditJob(ImageJob):
    """An editing request (inpainting, image-to-image) on a diffusion model's thread: it
    runs alone, ``run(callback)`` returning its ImageOutput, with previews as a batch's."""

    def __init__(self, run: Callable[[Callable[[int, int, Any], None]], Any], n: int,
                 partial_images: int = 0, watermark: str | None = None) -> None:  # fmt: skip
        self.run = run
        self.prepared = None
        self.n = n
        self.watermark = watermark
        self._start(("edit", id(self)), partial_images)


class _Abandoned(Exception):
    """Raised in the denoising loop when no request of the batch waits for it any more."""


class DiffusionBatcher:
    """The worker thread of one diffusion model (see the module docstring).

    pipeline: an aigc.pipelines.diffusion.DiffusionPipeline; encode: images (n, C, H, W)
    in [-1, 1] -> base64 PNGs.
    """

    def __init__(
        self,
        name: str,
        pipeline: Any,
        metrics: ServeMetrics,
        max_images: int,
        max_wait_ms: float,
        queue_size: int,
        encode: Callable[[Any], list[str]],
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_images = max_images
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.encode = encode
        self._cond = threading.Condition()
        self._waiting: deque[ImageJob] = deque()
        self._running: list[ImageJob] = []
        self._free_since = 0.0  # when the last batch ended (time.monotonic())
        self._stopping = False
        self._thread: threading.Thread | None = None
        metrics.queue_depth.labels(name).set_function(lambda: len(self._waiting))

    # -- the event loop's side ---------------------------------------------------

    def submit(self, job: ImageJob) -> None:
        """Queue a job; QueueFull when queue_size jobs wait already."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown(f"model {self.name!r} is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(self.name, len(self._waiting))
            self._waiting.append(job)
            if self._thread is None:  # started on first use
                self._thread = threading.Thread(
                    target=self._run, name=f"aigc-diffusion-{self.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def cancel(self, job: ImageJob) -> None:
        """Forget a job whose client left or timed out: out of the queue, or, when every
        job of the running batch is gone, the batch stops at its next step."""
        job.cancelled = True
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; jobs still queued or running get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                first = self._waiting[0].created
                if self.max_wait > 0 and first >= self._free_since:  # it found the model idle
                    self._gather(first + self.max_wait)
                self._running = self._take()
            if self._running:
                self._denoise(self._running)
            self._running = []
            self._free_since = time.monotonic()
        with self._cond:
            jobs, self._waiting = list(self._waiting), deque()
        for job in jobs:
            job.post(JobFailed("the server is shutting down"))

    def _gather(self, deadline: float) -> None:
        """An idle model: wait until `deadline` for more images to batch with (lock held).
        Requests that came while a batch ran have waited already, and go at once."""
        while not self._stopping:
            left = deadline - time.monotonic()
            if sum(j.n for j in self._waiting) >= self.max_images or left <= 0:
                return
            self._cond.wait(left)

    def _take(self) -> list[ImageJob]:
        """The next batch (lock held): the oldest job, and after it, oldest first, those
        of the same scheduler and step count while the images fit in max_images."""
        batch: list[ImageJob] = []
        images = 0
        for job in list(self._waiting):
            if batch and (job.key != batch[0].key or images + job.n > self.max_images):
                continue
            batch.append(job)
            images += job.n
            self._waiting.remove(job)
        return batch

    def _denoise(self, jobs: list[ImageJob]) -> None:
        from aigc.pipelines.base import ImageOutput

        spans, start = [], 0
        for job in jobs:
            spans.append((job, start, start + job.n))
            start += job.n

        def callback(step: int, total: int, x0: Any) -> None:
            if self._stopping or all(j.cancelled for j in jobs):
                raise _Abandoned
            for job, a, b in spans:
                if not job.cancelled and job.preview_due(step, total):
                    p = job.prepared
                    more = (p.labels, p.request.seed, p.prompts) if p is not None else ()
                    out = ImageOutput(x0[a:b].cpu(), *more)
                    images = self.encode(self.pipeline.postprocess(out, job.watermark).images)
                    job.post(Preview(job.previews_sent, step, total, images))
                    job.previews_sent += 1

        self.metrics.image_batch_size.labels(self.name).observe(start)
        try:
            if isinstance(jobs[0], EditJob):  # alone in its batch (its key is its own)
                outputs = [jobs[0].run(callback)]
            else:
                outputs = self.pipeline.run_batch([j.prepared for j in jobs], callback)
            results = [self.encode(out.images) for out in outputs]
        except _Abandoned:
            if self._stopping:
                for job in jobs:
                    job.post(JobFailed("the server is shutting down"))
            return
        except Exception as e:  # a bug: fail the batch, keep serving
            log.exception("denoising failed on %s", self.name)
            for job in jobs:
                job.post(JobFailed(f"denoising failed: {type(e).__name__}: {e}"))
            return
        for job, images in zip(jobs, results, strict=True):
            job.post(Finished(images))
