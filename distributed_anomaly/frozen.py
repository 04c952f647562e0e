"""PADIM's frozen backbone on OpenVINO or torch, emitting what the statistics and the head consume.

A PADIM fit is one forward pass of a frozen network per image plus a statistics update. In eager torch on a
CPU the backbone runs at a fraction of what OpenVINO gets from the same weights, and the embedding's
(B, C, P) layout forces a transpose before every per-position product. So the frozen network runs here as an
OpenVINO graph that emits, for a shift K given per call (the accumulator's, or the Gaussian means when
scoring), the deviations d = x - K laid out (B, P, C) and their sum over the batch: exactly what
`moments.MomentAccumulator` and `Padim.score_deviations` take, with no copy in between.

The taps-only network (the torchvision module up to its deepest tap, taps as outputs) is converted once and
cached on disk per (backbone, taps, image size, sha256 of the weights) under `cache_dir()`; the cheap tail
(PADIM's channel choice, nearest upsampling, layout, shift) is appended as OpenVINO ops at load time, so
every seed and feature count reuses one conversion. `TorchPatches` is the same interface on torch, the
reference that tests/test_frozen.py compares against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from distributed_anomaly.config import RUNTIMES
from distributed_anomaly.frozen_ir import CompiledPatches, CompiledTaps, check_precision, file_blob, ir_blob
from distributed_anomaly.models.backbones import FeatureExtractor
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.patchcore import PatchCore
from distributed_anomaly.models.stfpm import Stfpm

CACHE_ENV = "DISTRIBUTED_ANOMALY_CACHE"
_COMPLETE = "complete.json"  # written last: a cache entry without it is ignored and rebuilt


def cache_dir() -> Path:
    """Where converted extractors live: $DISTRIBUTED_ANOMALY_CACHE, else ~/.cache/distributed_anomaly; a
    temporary folder when that cannot be created (a container with a read-only home still fits)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "distributed_anomaly")
    path = Path(root) / "extractors"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(tempfile.gettempdir()) / "distributed_anomaly" / "extractors"
        path.mkdir(parents=True, exist_ok=True)
    return path


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state (names, shapes, bytes): a changed weight is a different cache entry."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, whatever the dtype
    return h.hexdigest()


FrozenModel = Padim | Stfpm | PatchCore


def frozen_extractor(model: FrozenModel) -> FeatureExtractor:
    """The network that never trains: PADIM's and PatchCore's backbone, STFPM's teacher."""
    return model.teacher if isinstance(model, Stfpm) else model.extractor


def extractor_key(model: FrozenModel) -> str:
    ext = frozen_extractor(model)
    spec = {
        "backbone": ext.backbone,
        "layers": list(ext.layers),
        "image_size": list(_hw(model.image_size)),
        "weights": weights_sha256(ext),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


class _Taps(torch.nn.Module):
    """The extractor with its taps as a tuple of outputs (what gets traced)."""

    def __init__(self, extractor: torch.nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.extractor(x)
        return tuple(feats[name] for name in self.extractor.layers)


def _convert_taps(model: FrozenModel, xml: Path) -> None:
    """Trace the torch extractor, convert it with OpenVINO and save it (fp32 weights) at `xml`."""
    import warnings

    import openvino as ov

    h, w = _hw(model.image_size)
    example = torch.zeros(2, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices; the graph is checked by parity tests
        traced = torch.jit.trace(_Taps(frozen_extractor(model)).eval(), example, check_trace=False)
        ov_model = ov.convert_model(traced, example_input=example, input=[ov.PartialShape([-1, 3, h, w])])
    ov.save_model(ov_model, xml, compress_to_fp16=False)


def taps_model_path(model: FrozenModel) -> Path:
    """The cached taps-only IR for this model's extractor, converting it first if absent (atomic per entry)."""
    entry = cache_dir() / extractor_key(model)
    if (entry / _COMPLETE).is_file():
        return entry / "taps.xml"
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        _convert_taps(model, tmp / "taps.xml")
        (tmp / _COMPLETE).write_text(json.dumps({"backbone": frozen_extractor(model).backbone}))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first (or a stale one is in the way)
            if not (entry / _COMPLETE).is_file():
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / "taps.xml"


def patch_graph(model: Padim, taps_xml: Path):
    """The taps IR with PADIM's tail appended: inputs (image, shift (P, C)) -> (deviations (B, P, C), sum (P, C))."""
    import openvino as ov
    import openvino.opset13 as ops

    taps_model = ov.Core().read_model(taps_xml)
    results = list(taps_model.get_results())
    taps = [r.input_value(0) for r in results]
    for r in results:  # the taps feed PADIM's tail now; dangling Result ops would confuse the CPU plugin
        taps_model.remove_result(r)
    grid_h, grid_w = model.grid
    parts = []
    for i, (_, sel) in enumerate(model.tap_channels()):
        if not sel.numel():
            continue
        part = ops.gather(taps[i], ops.constant(sel.numpy()), ops.constant(np.int64(1)))
        # Channels-last per tap, then deeper taps repeated onto the grid (torch's mode="nearest" at the integer
        # factors image sizes guarantee): a transpose of the whole concatenation instead cost OpenVINO a reorder
        # as well (fit graph, MobileNetV2 256 px, one thread: tail 1.96 -> 0.61 ms/img, all 7.88 -> 6.55).
        part = ops.transpose(part, ops.constant(np.array([0, 2, 3, 1], dtype=np.int64)))  # (B, h, w, c)
        factor = model.extractor.strides[i] // model.extractor.strides[0]
        if factor > 1:
            h, w, c = grid_h // factor, grid_w // factor, len(sel)
            part = ops.reshape(part, ops.constant(np.array([0, h, 1, w, 1, c], dtype=np.int64)), True)
            repeat = ops.constant(np.array([1, 1, factor, 1, factor, 1], dtype=np.int64))
            part = ops.broadcast(part, repeat, broadcast_spec="BIDIRECTIONAL")
            part = ops.reshape(part, ops.constant(np.array([0, grid_h, grid_w, c], dtype=np.int64)), True)
        parts.append(part)
    emb = ops.concat(parts, 3) if len(parts) > 1 else parts[0]
    emb = ops.reshape(emb, ops.constant(np.array([0, grid_h * grid_w, model.n_features], dtype=np.int64)), True)
    shift = ops.parameter([grid_h * grid_w, model.n_features], np.float32, name="shift")
    dev = ops.subtract(emb, shift)
    total = ops.reduce_sum(dev, ops.constant(np.int64(0)))
    taps_model.add_parameters([shift])
    taps_model.add_results([ops.result(dev), ops.result(total)])
    return taps_model


def _threads(threads: int | None) -> int:
    """OpenVINO threads: as asked, else torch's count (a Ray actor sets that to its reservation)."""
    return max(1, int(threads or torch.get_num_threads()))


def taps_blob(model: Stfpm) -> dict:
    """STFPM's teacher (the cached taps IR) as bytes: what a Ray Train worker compiles its OpenVinoTeacher from."""
    return file_blob(taps_model_path(model))


def patch_blob(model: Padim) -> dict:
    """PADIM's patched graph as bytes (frozen_ir.ir_blob): converted here, on the driver, once; a Ray pool actor
    compiles it without torch or a shared disk."""
    return ir_blob(patch_graph(model, taps_model_path(model)))


class TorchPatches:
    """The reference runtime: eager torch, same interface as OpenVinoPatches."""

    runtime = "torch"

    def __init__(self, model: Padim) -> None:
        self.model = model.eval()

    def __call__(self, images: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(deviations (B, P, C), their sum (P, C)) of the images' patch embeddings from `shift`."""
        with torch.inference_mode():
            dev = self.model.embed(images).transpose(1, 2) - shift
            return dev, dev.sum(0)

    def stream(
        self, batches: Iterable[torch.Tensor], shift: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x in batches:
            yield self(x, shift)


class OpenVinoPatches:
    """The frozen network compiled by OpenVINO on the CPU (see the module docstring), as torch tensors.

    `precision` is OpenVINO's inference precision: f32 (the reference, and the default) or bf16 where the CPU
    has it. `threads` defaults to torch's thread count (a Ray actor sets that to its reservation); the graph
    runs as frozen_ir.CompiledPatches (one single-threaded stream per thread).
    """

    runtime = "openvino"

    def __init__(self, model: Padim, threads: int | None = None, precision: str = "f32") -> None:
        self.precision = check_precision(precision)
        self.compiled = CompiledPatches(patch_graph(model, taps_model_path(model)), _threads(threads), precision)

    def __call__(self, images: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As TorchPatches.__call__; the tensors are copies the caller may keep."""
        dev, total = self.compiled(images.numpy(), shift.float().numpy())
        return torch.from_numpy(dev), torch.from_numpy(total)

    def stream(
        self, batches: Iterable[torch.Tensor], shift: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(deviations, sum) per chunk of at most SUB_BATCH images, in order (frozen_ir.CompiledPatches.stream):
        each pair views OpenVINO's output buffers and is valid until the next one is requested."""
        arrays = (x.numpy() for x in batches)
        for dev, total in self.compiled.stream(arrays, shift.float().numpy()):
            yield torch.from_numpy(dev), torch.from_numpy(total)


FrozenPatches = TorchPatches | OpenVinoPatches


class OpenVinoTeacher:
    """STFPM's teacher (or PatchCore's backbone) as the cached taps IR: images -> {tap: features}, as
    `Stfpm.teacher` returns them.

    Synchronous (the student's step needs this batch's features); OpenVINO uses `threads` threads (default
    torch's), at `precision` (f32 by default). `graph`: the taps IR to compile (default: this model's cached
    one; a Ray Train worker passes the driver's, rebuilt from frozen_ir.ir_blob)."""

    def __init__(
        self, model: Stfpm | PatchCore, threads: int | None = None, precision: str = "f32", graph=None
    ) -> None:
        self.layers = list(frozen_extractor(model).layers)
        source = graph if graph is not None else taps_model_path(model)
        self.compiled = CompiledTaps(source, _threads(threads), precision)

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.compiled(images.detach().numpy())
        return {name: torch.from_numpy(f) for name, f in zip(self.layers, feats)}


def teacher_runtime(
    model: Stfpm | PatchCore, runtime: str = "openvino", threads: int | None = None, precision: str = "f32"
) -> OpenVinoTeacher | None:
    """STFPM's teacher (PatchCore's backbone) on `runtime`: an OpenVinoTeacher at `precision`, or None for torch
    (the model's own network)."""
    if runtime == "torch":
        if precision != "f32":
            raise ValueError("the torch runtime computes in f32 only; bf16 is an OpenVINO precision")
        return None
    if runtime == "openvino":
        return OpenVinoTeacher(model, threads, precision)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")


@contextlib.contextmanager
def torch_beside(frozen: FrozenPatches) -> Iterator[None]:
    """Torch and numpy's BLAS on one thread while an OpenVINO runtime holds the cores (restored after).

    The caller's work (statistics update in numpy, Mahalanobis head in torch) runs while OpenVINO computes the
    next batch in its own threads. OpenMP and OpenBLAS workers spin-wait between parallel regions, so with their
    default thread counts beside OpenVINO's they fight for the cores: measured on 2 cores, 13 CPU-ms per image
    with one torch thread against 27-186 with two (bench/padim_profile.py runs the fit this way)."""
    if frozen.runtime == "torch":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def patch_runtime(
    model: Padim, runtime: str = "openvino", threads: int | None = None, precision: str = "f32"
) -> FrozenPatches:
    """The frozen network of `model` on `runtime` (RUNTIMES): a TorchPatches or an OpenVinoPatches."""
    if runtime == "torch":
        if precision != "f32":
            raise ValueError("the torch runtime computes in f32 only; bf16 is an OpenVINO precision")
        return TorchPatches(model)
    if runtime == "openvino":
        return OpenVinoPatches(model, threads, precision)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
