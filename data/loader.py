"""The face batch loader: worker processes decode whole batches into shared-memory slots that are reused.

Why not `torch.utils.data.DataLoader`: its workers hand every batch to the main process in a *fresh* shared-memory
segment. Creating that segment and faulting its pages in costs about as much as a quarter of the JPEG decoding of
a 112x112 batch (measured in docs/benchmarks.md, "Data path"), and DataLoader has no way to learn that the main
process is done with a batch, so it cannot recycle segments. Here the slots are allocated once, before the workers
start, and a slot goes back to the workers when the consumer asks for the next batch: a worker's time is spent
reading and decoding, and what crosses the process boundary per batch is a few hundred bytes of labels.

Contract, the same as ``DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate_faces)`` for a
:class:`data.dataset.FaceDataset` with ``output="uint8"``: each batch is ``(images, labels, bad_keys)``, images a
``(B, 3, 112, 112)`` uint8 tensor (channels-last strides), in the sampler's order, bit-identical to DataLoader's
batches. One difference: **``images`` is a view of a slot and is valid until the next batch is requested**;
``normalize_images(images.to(device))`` (what the trainer does) copies it. With ``pin_memory`` on a CUDA machine the
slots are page-locked once (``cudaHostRegister``), so ``images.to(device, non_blocking=True)`` is an asynchronous
copy; a slot is then reused only after the CUDA work queued before the next request (that copy included) is done.

``flip_on_device=True`` (what the trainer uses) leaves the random flip out of the workers, whose time is then read +
decode alone: each batch comes with a fourth tensor, ``flips`` (bool, from the augmentation seeds, so exactly the
images the workers would have mirrored), for ``normalize_images(..., flips=flips)`` on the device. On a GPU the
flip is one elementwise pass over the batch; in a worker, torch's uint8 flip costs ~5 us per mirrored 112x112 image,
7 % of a worker's time (docs/benchmarks.md).

Errors keep their type and message: a worker's :class:`data.recordio.RecordIOError` (e.g. a run of unusable
records) is raised again in the main process, naming the file; anything else is raised as ``RuntimeError`` with the
worker's traceback. A worker that dies (killed, out of memory) is not a hang and loses no batch: the loader logs it
with its exit code, records it in ``failure``, stops the other workers and decodes the rest in its own process (the
batches in flight included, so the batches are still exactly the sampler's); the trainer then saves and stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import traceback
import weakref
from collections.abc import Iterable, Iterator, Sized
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from data.dataset import IMAGE_SIZE, FaceDataset
from data.recordio import RecordIOError

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# How often a waiting main process checks that its workers are still alive (seconds).
_POLL_SECONDS = 1.0


class FaceLoader:
    """Batches of ``dataset`` in ``sampler``'s order from ``num_workers`` processes (0: in this process).

    ``prefetch`` batches per worker are decoded ahead. Workers start at the first iteration and persist until
    :meth:`close` (or garbage collection); every iteration draws a fresh pass from ``sampler``, as DataLoader does,
    so ``sampler.set_epoch`` / ``set_position`` between iterations work as usual.
    """

    def __init__(
        self,
        dataset: FaceDataset,
        batch_size: int,
        sampler: Iterable[Any],
        num_workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        drop_last: bool = True,
        flip_on_device: bool = False,
    ) -> None:
        if not isinstance(dataset, FaceDataset):
            raise TypeError(f"FaceLoader needs a data.dataset.FaceDataset, got {type(dataset).__name__}")
        if batch_size < 1 or num_workers < 0 or prefetch < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= 0, prefetch >= 1; got {batch_size}, {num_workers}, {prefetch}"
            )
        self.dataset, self.batch_size, self.sampler = dataset, int(batch_size), sampler
        self.num_workers, self.prefetch, self.drop_last = int(num_workers), int(prefetch), drop_last
        self.flip_on_device = flip_on_device
        # In flight: num_workers * prefetch; plus the batch the consumer holds; plus, with pinned memory, one
        # whose asynchronous copy to the device may still run.
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        count = max(1, self.num_workers * self.prefetch) + 1 + int(self.pin_memory)
        self.slots = torch.empty((count, self.batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
        if self.num_workers:
            self.slots.share_memory_()
        if self.pin_memory and _register_host_memory(self.slots):
            # Unpinned when the loader goes, while the slots still exist (a pinned range must not outlive them).
            weakref.finalize(self, _unregister_host_memory, self.slots.data_ptr())
        self._pool: _WorkerPool | None = None
        self._finalizer: Any = None
        self._iteration = 0
        # Why the workers are gone (a worker died); from then on every batch is decoded in this process.
        self.failure: str | None = None

    def __len__(self) -> int:
        samples = len(self.sampler) if isinstance(self.sampler, Sized) else 0
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    # ------------------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        self._iteration += 1
        if self.num_workers == 0 or self.failure is not None:
            return self._iterate_here(self._chunks())
        dead = self._dead_worker()  # one that died between two passes
        if dead is not None:
            self._lose_workers(dead)
            return self._iterate_here(self._chunks())
        self._start()
        return self._iterate_workers(self._iteration)

    def _chunks(self) -> Iterator[list[Any]]:
        chunk: list[Any] = []
        for item in self.sampler:
            chunk.append(item)
            if len(chunk) == self.batch_size:
                yield chunk
                chunk = []
        if chunk and not self.drop_last:
            yield chunk

    def _batch(self, slot: int, items: list[Any], labels: np.ndarray, bad_keys: np.ndarray) -> Batch:
        images = self.slots[slot, : len(items)].permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last strides
        batch = images, torch.from_numpy(labels), torch.from_numpy(bad_keys)
        if self.flip_on_device:  # the same flips the workers would have made, from the augmentation seeds
            return (*batch, torch.from_numpy(self.dataset.flips(items)))  # type: ignore[return-value]
        return batch

    def _iterate_here(self, chunks: Iterator[list[Any]]) -> Iterator[Batch]:
        pixels = self.slots.numpy()
        copied: list[Any] = [None] * len(self.slots)  # pinned: the CUDA event after the last copy from each slot
        for number, items in enumerate(chunks):
            slot = number % len(self.slots)
            if copied[slot] is not None:
                copied[slot].synchronize()  # an asynchronous copy from this slot may still run
            labels, bad_keys = self.dataset.fill_batch(items, pixels[slot], flip=not self.flip_on_device)
            yield self._batch(slot, items, labels, bad_keys)
            if self.pin_memory:  # the consumer asked for the next batch: its copy of this one is queued
                copied[slot] = torch.cuda.Event()
                copied[slot].record()

    def _iterate_workers(self, iteration: int) -> Iterator[Batch]:
        assert self._pool is not None  # started by __iter__
        tasks, results = self._pool.tasks, self._pool.results
        free = list(range(len(self.slots)))
        held: int | None = None  # the slot of the batch the consumer has
        copying: list[tuple[int, Any]] = []  # (slot, CUDA event): pinned slots whose device copy may still run
        ready: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        batch_items: dict[int, list[Any]] = {}
        batch_slots: dict[int, int] = {}  # the slot each batch in flight is decoded into
        chunks = self._chunks()
        sent = received = yielded = 0
        exhausted = False

        def dispatch() -> None:
            # Keep every worker busy, never more than `prefetch` batches per worker ahead of the consumer.
            nonlocal sent, exhausted
            while not exhausted and free and sent - yielded < self.num_workers * self.prefetch:
                items = next(chunks, None)
                if items is None:
                    exhausted = True
                    return
                # One int64 array pickles in microseconds; a list of 128 tuples costs a worker ~2 % of a batch.
                batch_slots[sent] = free.pop()
                tasks.put((iteration, sent, batch_slots[sent], np.asarray(items, dtype=np.int64)))
                batch_items[sent] = items
                sent += 1

        try:
            while True:
                if held is not None:  # the consumer asked for the next batch: it is done with this one
                    if self.pin_memory:
                        event = torch.cuda.Event()
                        event.record()
                        copying.append((held, event))
                    else:
                        free.append(held)
                    held = None
                # Reclaim pinned slots whose copy has run; with none free, wait for the oldest (the GPU is behind).
                while copying and (not free or copying[0][1].query()):
                    slot, event = copying.pop(0)
                    event.synchronize()
                    free.append(slot)
                dispatch()
                if yielded == sent and exhausted:
                    return
                try:
                    while yielded not in ready:  # batches come back in any order and are yielded in order
                        number, slot, rows, error = self._receive(results, iteration)
                        received += 1
                        if error is not None:
                            self._raise(number, error)
                        ready[number] = (slot, rows[0], rows[1])
                except _WorkerDied as died:
                    self._lose_workers(str(died))
                    yield from self._finish_here(range(yielded, sent), ready, batch_items, batch_slots, chunks)
                    return
                batch_slots.pop(yielded)
                slot, labels, bad_keys = ready.pop(yielded)
                items = batch_items.pop(yielded)
                held, yielded = slot, yielded + 1
                dispatch()  # the workers decode ahead while the consumer uses this batch
                yield self._batch(slot, items, labels, bad_keys)
        finally:
            # An abandoned pass (end of epoch by step count, an exception): collect what is still in flight, so
            # the next pass starts with an empty result queue. Its slots are simply forgotten with `free`.
            while received < sent and self._workers:
                try:
                    self._receive(results, iteration)
                except _WorkerDied as died:  # nothing more will come; the next pass runs in this process
                    self._lose_workers(str(died))
                    break
                received += 1

    def _finish_here(
        self,
        numbers: range,
        ready: dict[int, tuple[int, np.ndarray, np.ndarray]],
        batch_items: dict[int, list[Any]],
        batch_slots: dict[int, int],
        chunks: Iterator[list[Any]],
    ) -> Iterator[Batch]:
        """The rest of a pass after its workers were lost: the batches in flight (`numbers`, in order; those the
        workers finished as they are, the others decoded here into their slots), then the sampler's remaining
        batches, all in this process."""
        pixels = self.slots.numpy()
        if self.pin_memory:
            torch.cuda.synchronize()  # no asynchronous copy from a slot is still running
        for number in numbers:
            items = batch_items.pop(number)
            if number in ready:
                slot, labels, bad_keys = ready.pop(number)
            else:
                slot = batch_slots[number]
                labels, bad_keys = self.dataset.fill_batch(items, pixels[slot], flip=not self.flip_on_device)
            yield self._batch(slot, items, labels, bad_keys)
        if self.pin_memory:
            torch.cuda.synchronize()
        yield from self._iterate_here(chunks)

    def _receive(self, results: Any, iteration: int) -> tuple[int, int, np.ndarray, Any]:
        """The next result of this pass: ``(batch number, slot, [labels, bad_keys], error)``.

        Every worker is checked alive at each call (one `waitpid` each), not only while waiting: the others would
        otherwise take over a dead worker's share without a word, and the run would go on with fewer workers."""
        while True:
            dead = self._dead_worker()
            if dead is not None:
                raise _WorkerDied(dead)
            try:
                message = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            their_iteration, *result = message
            if their_iteration == iteration:  # else left over from a pass whose clean-up was cut short
                return tuple(result)  # type: ignore[return-value]

    @staticmethod
    def _raise(number: int, error: tuple[str, str]) -> None:
        kind, text = error
        if kind == "RecordIOError":  # bad data: the trainer reports it in one line, naming the file
            raise RecordIOError(text)
        raise RuntimeError(f"data worker failed on batch {number}:\n{text}")

    # ------------------------------------------------------------------------------------------------------------
    # Workers

    @property
    def _workers(self) -> list[BaseProcess]:
        return self._pool.processes if self._pool is not None else []

    def _start(self) -> None:
        if self._pool is not None:
            return
        self._pool = _WorkerPool(self.dataset, self.slots, self.num_workers, not self.flip_on_device)
        # Stopped at garbage collection or interpreter exit, before multiprocessing's own exit handler would
        # terminate() workers that ignore SIGTERM (and wait for them forever).
        self._finalizer = weakref.finalize(self, self._pool.close)

    def _dead_worker(self) -> str | None:
        """What happened to the first worker that is no longer running, or None."""
        for process in self._workers:
            if not process.is_alive():
                code = process.exitcode
                how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                return f"data worker {process.name} died ({how}; out of memory?) while loading {self.dataset.source}"
        return None

    def _lose_workers(self, why: str) -> None:
        """A worker died: say so once, stop the others, and decode in this process from now on."""
        self.failure = why
        logger.error("%s; the other workers are stopped and this process decodes the batches from here on", why)
        self.close()

    def close(self) -> None:
        """Stop the workers (the next iteration starts new ones)."""
        if self._pool is not None:
            self._finalizer()  # runs _WorkerPool.close once
            self._pool = None


class _WorkerDied(Exception):
    """A worker process is gone (the message says which and how); handled inside the loader."""


class _WorkerPool:
    """The worker processes and their two queues: tasks (slot, items) out, results (labels, or an error) back."""

    def __init__(self, dataset: FaceDataset, slots: torch.Tensor, count: int, flip: bool) -> None:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        self.tasks, self.results = context.Queue(), context.Queue()
        self.processes: list[BaseProcess] = []
        for worker_id in range(count):
            process = context.Process(
                target=_worker_loop,
                args=(dataset, slots, self.tasks, self.results, worker_id, flip, os.getpid()),
                name=f"face-loader-{worker_id}",
                daemon=True,  # never outlive the training process
            )
            process.start()
            self.processes.append(process)

    def close(self) -> None:
        for _ in self.processes:
            self.tasks.put(None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for channel in (self.tasks, self.results):
            channel.close()
            channel.join_thread()


def _worker_loop(
    dataset: FaceDataset, slots: torch.Tensor, tasks: Any, results: Any, seed: int, flip: bool, parent: int
) -> None:
    """Fill slots until told to stop (None) or the training process is gone."""
    # Ctrl-C reaches the whole process group, a scheduler's SIGTERM often too: the training process decides when
    # to stop (it finishes the step and saves a checkpoint, which needs its workers), then stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # one core per worker; torch's pool would only add wake-ups on small ops
    # The flip's fallback stream when the sampler gives no augmentation seeds (the trainer's always does: its flips
    # depend on (seed, epoch, sample) alone); here only the worker's number seeds it.
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    pixels = slots.numpy()
    while True:
        try:
            task = tasks.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        iteration, number, slot, items = task
        try:
            labels, bad_keys = dataset.fill_batch(items.tolist(), pixels[slot], flip=flip)
            results.put((iteration, number, slot, np.stack([labels, bad_keys]), None))
        except Exception as error:  # sent to the main process, which raises it there
            kind = "RecordIOError" if isinstance(error, RecordIOError) else type(error).__name__
            text = str(error) if kind == "RecordIOError" else traceback.format_exc()
            results.put((iteration, number, slot, None, (kind, text)))


def _register_host_memory(tensor: torch.Tensor) -> bool:
    """Page-lock ``tensor``'s memory in place, so host-to-device copies from it are asynchronous."""
    code = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0)
    if int(code) != 0:
        logger.warning("could not pin the loader's %d MB of slots (CUDA error %s)", tensor.nbytes >> 20, int(code))
    return int(code) == 0


def _unregister_host_memory(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)
