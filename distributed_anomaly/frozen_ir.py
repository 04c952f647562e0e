"""Frozen networks compiled by OpenVINO on the CPU, numpy in and numpy out: the torch-free half of frozen.py.

frozen.py converts a torch extractor to an IR (once, cached) and appends PADIM's tail; what runs the compiled
graph lives here, so that a Ray pool actor given the IR as bytes (`ir_blob`, shipped through the object store:
nodes share no disk) runs the frozen network, decodes its images and folds statistics without importing torch
(tests/test_node_runtime.py checks sys.modules in such an actor). frozen.OpenVinoPatches and
frozen.OpenVinoTeacher wrap these classes as torch tensors for the in-process paths.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# OpenVINO inference precisions of a frozen network: f32 the reference, bf16 where the CPU has it (avx512_bf16,
# AMX): OpenVINO then computes in bfloat16 (~2x the throughput; an AUROC change measured in docs/benchmarks.md).
FROZEN_PRECISIONS = ("f32", "bf16")


# OpenVINO pins its CPU threads to cores by default, as if its process owned the machine. Ours share nodes: two
# Ray pool actors on a 2-core node both pinned their inference thread to core 0 (`taskset -p`), and two 1-thread
# Serve replicas ran 29 instead of 58 images/s each (bench/openvino_pinning.py); unpinned, the OS spreads them
# (docs/benchmarks.md). Every CPU compile of ours uses it: the frozen networks here, the exported model's inferencer.
UNPINNED = {"ENABLE_CPU_PINNING": False}


def check_precision(precision: str) -> str:
    if precision not in FROZEN_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(FROZEN_PRECISIONS)}")
    return precision


def ir_blob(model) -> dict[str, Any]:
    """An ov.Model as {xml: bytes, bin: uint8 array}: what a Ray actor on another node rebuilds it from."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, xml, compress_to_fp16=False)
        return {"xml": xml.read_bytes(), "bin": np.fromfile(xml.with_suffix(".bin"), dtype=np.uint8)}


def file_blob(xml: str | Path) -> dict[str, Any]:
    """A saved IR (xml + its bin) as an `ir_blob`, read as it is."""
    xml = Path(xml)
    return {"xml": xml.read_bytes(), "bin": np.fromfile(xml.with_suffix(".bin"), dtype=np.uint8)}


def read_blob(blob: dict[str, Any]):
    """The ov.Model of an `ir_blob` (its weights copied once: the object store hands out read-only buffers)."""
    import openvino as ov

    return ov.Core().read_model(blob["xml"], ov.Tensor(np.array(blob["bin"], dtype=np.uint8)))


def compile_frozen(model, threads: int, precision: str, hints: dict):
    """A frozen network (ov.Model or IR path) compiled for the CPU at `precision` with `threads` threads, not
    pinned to cores (UNPINNED)."""
    import openvino as ov

    config = {
        "INFERENCE_PRECISION_HINT": check_precision(precision),
        "INFERENCE_NUM_THREADS": max(1, int(threads)),
        **UNPINNED,
        **hints,
    }
    return ov.Core().compile_model(model, "CPU", config)


def compiled_precision(compiled) -> str:
    """The precision the CPU plugin actually compiled at (f32 or bf16), read back from the compiled model."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


class CompiledPatches:
    """PADIM's patched graph (images (B, 3, H, W), shift (P, C)) -> (deviations (B, P, C), sum (P, C)), numpy.

    Runs as `threads` single-threaded streams (OpenVINO's throughput mode, at most MAX_STREAMS), each on its own
    batch: on a few cores shared with decoding and the statistics update, one multi-threaded stream stalls at
    every layer on whichever of its threads was preempted.
    """

    MAX_STREAMS = 4
    # Images per OpenVINO call, whatever the caller's batch: each stream's intermediate buffers grow with it
    # (MobileNetV2 at 256 px: ~0.9 GB more peak RSS for 2 streams at 32 than at 8) while the cores are already
    # busy at 8 (bench/results/padim_fit_subbatch.txt).
    SUB_BATCH = 8

    def __init__(self, graph, threads: int, precision: str = "f32") -> None:
        self.precision = precision
        self.streams = min(max(1, int(threads)), self.MAX_STREAMS)
        self.compiled = compile_frozen(
            graph, threads, precision, {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams}
        )
        # One request per stream plus one: every stream busy while the caller folds the oldest result.
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams + 1)]

    @staticmethod
    def _outputs(request) -> tuple[np.ndarray, np.ndarray]:
        return request.get_output_tensor(0).data, request.get_output_tensor(1).data

    @staticmethod
    def _start(request, images: np.ndarray, shift: np.ndarray) -> None:
        request.start_async({0: np.ascontiguousarray(images, dtype=np.float32), 1: shift})

    def _split(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for x in batches:
            for i in range(0, len(x), self.SUB_BATCH):
                yield x[i : i + self.SUB_BATCH]

    def __call__(self, images: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(deviations, sum) of one batch, its SUB_BATCH chunks streamed: arrays the caller may keep."""
        if not len(images):
            raise ValueError("CompiledPatches needs at least one image")
        devs, total, row = None, None, 0
        for dev, part in self.stream([images], shift):
            if devs is None:
                devs = np.empty((len(images), *dev.shape[1:]), dtype=dev.dtype)
            devs[row : row + len(dev)] = dev
            row += len(dev)
            total = part.copy() if total is None else total + part
        return devs, total

    def stream(self, batches: Iterable[np.ndarray], shift: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(deviations, sum) per SUB_BATCH images in order (a batch's rows in its chunks), up to one chunk per
        request in flight. Each yielded pair views OpenVINO's output buffers and is valid until the next one is
        requested (the caller folds it, lets go)."""
        shift = np.ascontiguousarray(shift, dtype=np.float32)
        ring, it = self._requests, self._split(batches)
        in_flight = 0
        for x in it:  # fill every request but one
            self._start(ring[in_flight], x, shift)
            in_flight += 1
            if in_flight == len(ring) - 1:
                break
        oldest = 0
        while in_flight:
            x = next(it, None)
            if x is not None:  # the free request takes the next batch before we wait on the oldest
                self._start(ring[(oldest + in_flight) % len(ring)], x, shift)
                in_flight += 1
            ring[oldest].wait()
            yield self._outputs(ring[oldest])
            oldest, in_flight = (oldest + 1) % len(ring), in_flight - 1


class CompiledTaps:
    """A taps-only IR (STFPM's teacher): images (B, 3, H, W) -> one feature array per tap, numpy copies.

    Synchronous (the student's step needs this batch's features), OpenVINO's latency mode on `threads` threads."""

    def __init__(self, graph, threads: int, precision: str = "f32") -> None:
        self.precision = precision
        self.compiled = compile_frozen(graph, threads, precision, {"PERFORMANCE_HINT": "LATENCY"})
        self._request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        self._request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return [self._request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]
