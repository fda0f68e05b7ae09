"""Batched inference: a prefetching loader, an OOM-proof runner, the forward pass, the batch-size measurement.

Chips are memory-mapped and read into batches by a background thread while
the device works on the previous batch (a bounded queue: memory is a few
batches, whatever the size of the partition). Batches come out in storage
order, so the output order is deterministic. On CUDA the forward runs under
autocast from pinned memory; when it runs out of memory the batch is halved
and the run carries on. On CPU the best batch size is small and depends on the
machine, so :func:`tune_batch_size` measures it instead of assuming it
(``ops.ml.batch_size`` decides when). A partition's shards go through the
models in ``ops.ml.predict``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")
U = TypeVar("U")
Forward = Callable[[torch.Tensor], np.ndarray]


def reuse_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse instead of returning them to the OS.

    A CPU forward allocates activations of several MB per tensor (16 × 64 × 64
    floats per chip at the first layer). glibc serves blocks that large with
    ``mmap`` and frees them with ``munmap``, so every forward pays fresh page
    faults for all its activations: measured here, the classifier ran about
    1.4× faster once that stopped. Freed memory then stays with the process
    (its RSS holds at the peak of one batch's activations), which is what a
    step process does anyway. Returns False where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def prefetch(items: Iterable[T], load: Callable[[T], U], depth: int = 3) -> Iterator[U]:
    """``load(item)`` for each item, computed ahead on a background thread, yielded in order.

    At most ``depth`` loaded items wait in the queue. An exception in ``load``
    is re-raised in the consumer; a consumer that stops early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for it in items:
                if not put(("ok", load(it))):
                    return
            put(("end", done))
        except BaseException as exc:  # handed to the consumer
            put(("err", exc))

    th = threading.Thread(target=work, name="chip-prefetch", daemon=True)
    th.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "err":
                raise value
            yield value
    finally:
        stop.set()
        th.join(timeout=5)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


class BatchRunner:
    """Runs ``forward`` over a batch in chunks of at most ``max_batch``; halves it on out-of-memory.

    The halved size sticks for the rest of the run (memory pressure rarely
    goes away by itself); a chip that does not fit alone is a real error.
    """

    def __init__(self, forward: Forward, max_batch: int, log: Callable[[str], None] | None = None) -> None:
        self.forward = forward
        self.max_batch = max(1, int(max_batch))
        self.log = log or (lambda _msg: None)
        self.halvings = 0

    def __call__(self, xb: torch.Tensor) -> np.ndarray:
        outs = []
        i = 0
        while i < len(xb):
            chunk = xb[i : i + self.max_batch]
            try:
                outs.append(self.forward(chunk))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                if not is_out_of_memory(exc) or len(chunk) == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.max_batch = max(1, len(chunk) // 2)
                self.halvings += 1
                self.log(f"out of memory at batch {len(chunk)}: carrying on at batch {self.max_batch}")
                continue
            i += len(chunk)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]


def forward_fn(model: nn.Module, device: torch.device, task: str = "classification") -> Forward:
    """uint8 batch (CPU) → class probabilities as float32 numpy (N×C or N×C×S×S); a regression's values (N×1)."""
    cuda = device.type == "cuda"
    values = task == "regression"

    @torch.inference_mode()
    def run(xb: torch.Tensor) -> np.ndarray:
        xb = xb.to(device, non_blocking=True)
        if cuda:
            with torch.autocast("cuda", dtype=torch.float16):
                logits = model(xb)
        else:
            logits = model(xb)
        return logits.float().cpu().numpy() if values else torch.softmax(logits.float(), dim=1).cpu().numpy()

    return run


def tune_batch_size(
    forwards: Sequence[Forward],
    sample: np.ndarray,
    candidates: Sequence[int] = (8, 16, 32, 64, 128),
    min_images: int = 256,
    rounds: int = 2,
) -> tuple[int, dict[int, float]]:
    """The batch size that gives the most images/s for ``forwards`` together, measured on ``sample``.

    Every candidate runs at least ``min_images`` images after a warm-up batch, in
    ``rounds`` interleaved rounds (so a burst of load elsewhere on the machine
    does not decide alone), keeping its best round; the two best then run four
    times longer and the faster wins. Returns (best, {batch: images/s}).
    """
    x = torch.from_numpy(np.array(sample))
    sizes = [bs for bs in candidates if bs <= len(x)]
    if not sizes:
        return max(1, len(x)), {}

    def measure(bs: int, need: int) -> float:
        for f in forwards:
            f(x[:bs])
        n, t0 = 0, time.perf_counter()
        while n < need:
            for i in range(0, len(x) - bs + 1, bs):
                for f in forwards:
                    f(x[i : i + bs])
                n += bs
                if n >= need:
                    break
        return n / (time.perf_counter() - t0)

    rates: dict[int, float] = dict.fromkeys(sizes, 0.0)
    for _ in range(rounds):
        for bs in sizes:
            rates[bs] = max(rates[bs], measure(bs, max(min_images, bs * 2)))
    # the two best, again, four times longer: neighbours often differ by less than the noise of a short run
    finalists = sorted(rates, key=rates.get, reverse=True)[:2]
    final = {bs: measure(bs, max(4 * min_images, bs * 4)) for bs in finalists}
    rates.update(final)
    return max(final, key=final.get), rates
