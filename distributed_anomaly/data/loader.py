"""In-process batching of records into model-ready tensors, decoding in threads one batch ahead.

Decoding (PIL releases the GIL) overlaps the forward pass; memory is bounded by two batches, whatever the
dataset size.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from distributed_anomaly.data.images import image_shape, read_image, read_mask, resize_mask, to_tensor
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.errors import DatasetLayoutError


def load_batch(records: Sequence[Record], image_size: int) -> torch.Tensor:
    return to_tensor([read_image(r.path) for r in records], image_size)


def iter_batches(records: Sequence[Record], image_size: int, batch_size: int,
                 threads: int = 2) -> Iterator[tuple[Sequence[Record], torch.Tensor]]:
    """Yield (records, tensor) batches in order, preparing the next batch while the caller works."""
    chunks = [records[i: i + batch_size] for i in range(0, len(records), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def submit(chunk: Sequence[Record]):
            return [pool.submit(read_image, r.path) for r in chunk]
        pending = submit(chunks[0])
        for i, chunk in enumerate(chunks):
            images = [f.result() for f in pending]
            if i + 1 < len(chunks):
                pending = submit(chunks[i + 1])
            yield chunk, to_tensor(images, image_size)


def load_masks(records: Sequence[Record], image_size: int) -> np.ndarray:
    """(N, S, S) bool ground truth at model resolution; all-False for normal images."""
    out = np.zeros((len(records), image_size, image_size), dtype=bool)
    for i, r in enumerate(records):
        if r.mask_path is not None:
            mask = read_mask(r.mask_path)
            size = image_shape(r.path)
            if mask.shape != size:
                raise DatasetLayoutError(f"mask {r.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                         f"{r.path} is {size[1]}x{size[0]}")
            out[i] = resize_mask(mask, image_size)
    return out


class Progress:
    """One line of progress on stderr (images done, images/s), rewritten in place on a terminal."""

    def __init__(self, total: int, what: str, enabled: bool = True, min_interval: float = 1.0) -> None:
        self.total, self.what, self.enabled, self.min_interval = total, what, enabled, min_interval
        self.done = 0
        self.start = self._last = time.perf_counter()
        self._tty = sys.stderr.isatty()

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.min_interval or self.done >= self.total):
            self._last = now
            line = f"{self.what}: {self.done}/{self.total} images, {self.rate:.1f} images/s{extra}"
            print(("\r" + line) if self._tty else line, end="" if self._tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self._tty:
            print(file=sys.stderr, flush=True)
