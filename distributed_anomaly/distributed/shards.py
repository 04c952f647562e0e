"""How STFPM's training images are ordered each epoch and split between Ray Train's workers, in a module that
imports nothing but Ray and numpy.

Ray Train unpickles the data config in processes that never train: its controller and its DatasetManager actor.
A class is pickled by reference to its module, so a config class defined beside the training driver
(stfpm_train, which imports torch, torchvision and the models) made both import all of them on every run: with
it there, /proc/PID/maps of a 2-worker run showed torch and torchvision in both; from here, none in the
DatasetManager (the controller still loads torch, for Ray's own TorchConfig). The same holds for the epoch order's
map function (`shuffled_blocks`): the Ray Data tasks that run it (fused with decoding: data.decode) import
nothing heavier.

The epoch order replaces Ray Data's `random_shuffle` of the paths, an all-to-all exchange (a map and a reduce
task per block): every task computes the whole epoch's permutation from (seed, execution index, number of
images) and takes its block's share, so no data moves and the order is the same kind as before (a seeded
uniform permutation of all the images, a new one every epoch). Run with the decode tasks' concurrency, Ray Data
fuses it with decoding (its plan: MapBatches(shuffled_blocks)->MapBatches(decode_batch), one task per block).
On a local Ray that had not run it yet, three epochs of 24 images went from 5.4-7.6 s
(10.1-14.0 CPU-seconds, 11 Ray processes afterwards) to 2.3-2.7 s (3.8-4.6 CPU-seconds, 6 processes); on a warm
one from 0.8-1.2 to 0.5-0.6 s (bench/stfpm_epoch_data.py, bench/results/stfpm_epoch_data.txt).
The price: every decode task process holds the list of paths (about 100 bytes an image, 100 MB at a million)
and draws the permutation once per epoch (cached per process).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray.data import DataContext, RandomSeedConfig
from ray.train import DataConfig


class NoDropDataConfig(DataConfig):
    """Ray Train's DataConfig, but streaming_split(equal=False): no image dropped to even out the shards.

    preserve_order makes the split deterministic: Ray Data's splitter gives each block, in order, to the
    rank with the fewest rows so far.
    """

    def configure(
        self, datasets: dict, world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any
    ) -> list[dict]:
        output: list[dict] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            options = self._resolve_execution_options(name)
            options.preserve_order = True
            ds.context.execution_options = options
            for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                output[i][name] = split
        return output


@functools.lru_cache(maxsize=2)  # the tasks of one epoch in one worker process share it
def epoch_order(n: int, seed: int, execution: int) -> np.ndarray:
    """The order of n training images in one epoch (one execution of the dataset): a permutation of range(n),
    the same for the same (seed, execution), read-only (it is shared)."""
    order = np.random.default_rng((seed, execution)).permutation(n)
    order.flags.writeable = False
    return order


def execution_index() -> int:
    """Which execution of its dataset the calling Ray Data task belongs to (one per epoch of training), as Ray
    Data's own reseeding reads it (`RandomSeedConfig(reseed_after_execution=True)`, what its `random_shuffle`
    uses): Ray Data counts executions in the DataContext it ships with every task."""
    seeded = RandomSeedConfig(seed=0, reseed_after_execution=True).get_seed_tuple(
        data_context=DataContext.get_current()
    )
    return int(seeded.execution_idx)


def shuffled_blocks(
    batch: dict[str, np.ndarray], paths: Sequence[str], seed: int, block_size: int
) -> dict[str, np.ndarray]:
    """map_batches function: for each block number in `batch["block"]`, that block of this epoch's order of
    `paths` (block_size images; the last block the rest) as rows {idx, path}, for data.decode.decode_batch."""
    order = epoch_order(len(paths), seed, execution_index())
    idx = np.concatenate([order[b * block_size : (b + 1) * block_size] for b in batch["block"]])
    return {"idx": idx, "path": np.array([paths[i] for i in idx], dtype=object)}
