"""OpenVINO inference of an exported IR folder (see `export`), through the same post-processing as torch.

    inf = OpenVINOInferencer("ir/tile_padim", num_threads=2)
    preds = inf.predict([read_image("x.png")])      # list[postprocess.Prediction], as torch_runner.predict_arrays
    maps = inf.anomaly_maps(normalise(images, inf.image_size))   # (B, H, W) raw maps (data.decode.normalise)

The network is compiled once. `num_threads` sets OpenVINO's INFERENCE_NUM_THREADS (give each Ray Serve
replica its share of the cores); None leaves OpenVINO's default (all cores). On CPU and GPU the inference
precision hint is the export's (irformat.inference_precision: bf16 for a bf16 export, else f32) unless
`precision` or `config` says otherwise, so an fp32 (or fp16-weights) IR scores like torch even on CPUs whose
default would be bf16; on CPU the threads are not pinned to cores (several processes share a
node). Calls are thread-safe (one infer request per calling thread).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distributed_anomaly.data.sizes import as_hw, canonical
from distributed_anomaly.errors import RunDirError, UserError
from distributed_anomaly.fileio import read_json
from distributed_anomaly.frozen_ir import UNPINNED, compiled_precision
from distributed_anomaly.irformat import (
    BIN,
    INPUT_NAME,
    OUTPUT_NAME,
    POSTPROCESS,
    XML,
    check_ir_files,
    check_model_bin,
    inference_precision,
    read_metadata,
)
from distributed_anomaly.postprocess import PostProcessor, Prediction
from distributed_anomaly.runner import predict_images

INFERENCE_PRECISIONS = ("f32", "bf16")  # OpenVINO's compute precision: what `precision` overrides


class OpenVINOInferencer:
    """An exported IR folder as a `runner.ModelRunner`: `image_size`, `postprocessor`, `raw_maps`."""

    def __init__(
        self,
        ir_dir: str | os.PathLike,
        num_threads: int | None = None,
        device: str = "CPU",
        config: dict[str, Any] | None = None,
        precision: str | None = None,
    ) -> None:
        import openvino as ov

        self.ir_dir = Path(ir_dir)
        if not self.ir_dir.is_dir():
            raise RunDirError(f"{self.ir_dir} is not a folder (expected an OpenVINO export with {XML})")
        check_ir_files(self.ir_dir, {p.name for p in self.ir_dir.iterdir() if p.is_file()})
        self.metadata = read_metadata(self.ir_dir)
        self.bin_sha256 = check_model_bin(self.ir_dir, self.metadata)  # a truncated or mixed copy fails here
        try:
            self.image_size = canonical(self.metadata["image_size"])  # S, or [H, W] when not square
            self.postprocessor = PostProcessor.from_dict(self._read_json(POSTPROCESS))
        except (KeyError, TypeError, ValueError, UserError) as exc:
            raise RunDirError(f"cannot read the metadata of {self.ir_dir}: {exc}") from exc
        if num_threads is not None and num_threads < 1:
            raise UserError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.device = device

        core = ov.Core()
        try:
            model = core.read_model(self.ir_dir / XML, self.ir_dir / BIN)
        except RuntimeError as exc:
            raise RunDirError(f"OpenVINO cannot read {self.ir_dir / XML}: {exc}") from exc
        ins, outs = [set(p.get_names()) for p in model.inputs], [set(p.get_names()) for p in model.outputs]
        if len(ins) != 1 or INPUT_NAME not in ins[0] or len(outs) != 1 or OUTPUT_NAME not in outs[0]:
            raise RunDirError(
                f"{self.ir_dir / XML} has inputs {ins} and outputs {outs}; expected one input "
                f"'{INPUT_NAME}' and one output '{OUTPUT_NAME}' (not a model written by `export`?)"
            )
        if precision not in (None, *INFERENCE_PRECISIONS):
            raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(INFERENCE_PRECISIONS)}")
        props: dict[str, Any] = {}
        if device.split(".")[0] in ("CPU", "GPU"):
            props["INFERENCE_PRECISION_HINT"] = precision or inference_precision(self.metadata)
        if device.split(".")[0] == "CPU":
            props.update(UNPINNED)  # several processes share a node (frozen_ir.UNPINNED)
        if num_threads is not None:
            props["INFERENCE_NUM_THREADS"] = int(num_threads)
        props.update(config or {})
        try:
            self.compiled = core.compile_model(model, device, props)
        except RuntimeError as exc:
            raise UserError(f"OpenVINO cannot compile {self.ir_dir / XML} for {device}: {exc}") from exc
        self._local = threading.local()

    def _read_json(self, name: str) -> Any:
        try:
            return read_json(self.ir_dir / name)
        except (OSError, ValueError) as exc:
            raise RunDirError(f"cannot read {self.ir_dir / name}: {exc}") from exc

    @property
    def precision(self) -> str:
        return str(self.metadata.get("precision", "fp32"))

    @property
    def compiled_precision(self) -> str:
        """The precision OpenVINO compiled at (f32 or bf16), as the device reports it."""
        return compiled_precision(self.compiled)

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def anomaly_maps(self, batch) -> np.ndarray:
        """(B, 3, H, W) float32 normalised batch (numpy as `normalise` gives, or a tensor) -> (B, H, W) raw maps."""
        x = batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)
        x = np.ascontiguousarray(x, dtype=np.float32)
        height, width = as_hw(self.image_size)
        if x.ndim != 4 or x.shape[1:] != (3, height, width):
            raise UserError(f"expected a (B, 3, {height}, {width}) batch, got {tuple(x.shape)}")
        if len(x) == 0:
            return np.zeros((0, height, width), dtype=np.float32)
        result = self._request().infer({INPUT_NAME: x})
        return np.array(result[self.compiled.output(0)][:, 0], dtype=np.float32)  # copy: the buffer is reused

    raw_maps = anomaly_maps  # the runner.ModelRunner method name

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """RGB uint8 (H, W, 3) images -> Predictions in each image's own coordinates (same path as torch)."""
        return predict_images(self, images)

    def __repr__(self) -> str:
        return (
            f"OpenVINOInferencer({str(self.ir_dir)!r}, model={self.metadata.get('model')}, "
            f"precision={self.precision}, device={self.device}, num_threads={self.num_threads})"
        )
