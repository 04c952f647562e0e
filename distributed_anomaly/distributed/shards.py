"""How Ray Train splits STFPM's datasets between its workers, in a module that imports nothing but Ray Train.

Ray Train unpickles the data config in processes that never train: its controller and its DatasetManager actor.
A class is pickled by reference to its module, so a config class defined beside the training driver
(stfpm_train, which imports torch, torchvision and the models) made both import all of them on every run: with
it there, /proc/PID/maps of a 2-worker run showed torch and torchvision in both; from here, none in the
DatasetManager (the controller still loads torch, for Ray's own TorchConfig).
"""

from __future__ import annotations

from typing import Any

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
