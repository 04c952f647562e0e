"""In-process batching of records into model-ready tensors, decoding in threads two batches ahead.

Decoding (PIL releases the GIL) overlaps the forward pass; memory is bounded by three batches, whatever the
dataset size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from distributed_anomaly.data.images import image_shape, read_image, read_mask, resize_mask, to_tensor
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import DatasetLayoutError


def load_batch(records: Sequence[Record], image_size: ImageSize) -> torch.Tensor:
    return to_tensor([read_image(r.path, target_size=image_size) for r in records], image_size)


def _prepare(path: str, image_size: ImageSize) -> torch.Tensor:
    """Decode, resize and normalise one image: the whole per-image cost, in a loader thread."""
    return to_tensor(read_image(path, target_size=image_size), image_size)[0]


def iter_batches(
    records: Sequence[Record], image_size: ImageSize, batch_size: int, threads: int = 2
) -> Iterator[tuple[Sequence[Record], torch.Tensor]]:
    """Yield (records, tensor) batches in order, preparing the next two batches while the caller works.

    Each image is decoded, resized and normalised in a pool thread (PIL and torch release the GIL), so the
    caller's thread only stacks finished images; with a frozen network on OpenVINO the caller keeps torch on
    one thread (frozen.torch_beside), so these threads do not multiply torch's own.
    """
    chunks = [records[i : i + batch_size] for i in range(0, len(records), batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:

        def submit(chunk: Sequence[Record]):
            return [pool.submit(_prepare, r.path, image_size) for r in chunk]

        pending = [submit(c) for c in chunks[:2]]
        for i, chunk in enumerate(chunks):
            images = [f.result() for f in pending.pop(0)]
            if i + 2 < len(chunks):
                pending.append(submit(chunks[i + 2]))
            yield chunk, torch.stack(images)


def load_masks(records: Sequence[Record], image_size: ImageSize) -> np.ndarray:
    """(N, H, W) bool ground truth at model resolution; all-False for normal images."""
    out = np.zeros((len(records), *as_hw(image_size)), dtype=bool)
    for i, r in enumerate(records):
        if r.mask_path is not None:
            mask = read_mask(r.mask_path)
            size = image_shape(r.path)
            if mask.shape != size:
                raise DatasetLayoutError(
                    f"mask {r.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{r.path} is {size[1]}x{size[0]}"
                )
            out[i] = resize_mask(mask, image_size)
    return out
