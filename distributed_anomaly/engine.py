"""In-process fitting and scoring: what is computed, independent of where (Ray code calls these pieces)."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from distributed_anomaly.config import DEFAULT_RUNTIME
from distributed_anomaly.data.images import read_image
from distributed_anomaly.data.loader import iter_batches
from distributed_anomaly.data.mvtec import Record
from distributed_anomaly.data.progress import Progress
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.errors import ImageReadError
from distributed_anomaly.frozen import FrozenPatches, OpenVinoTeacher, patch_runtime, teacher_runtime, torch_beside
from distributed_anomaly.models.coreset import CHUNK_PATCHES, CoresetResult, StreamingCoreset
from distributed_anomaly.models.padim import Padim
from distributed_anomaly.models.patchcore import PatchCore
from distributed_anomaly.models.stfpm import Stfpm, anomaly_map
from distributed_anomaly.moments import MomentAccumulator
from distributed_anomaly.stats import GaussianStats, accumulation_dtype, gaussian_from_moments


def unreadable_images(records: Sequence[Record], threads: int = 4) -> list[tuple[Record, str]]:
    """(record, reason) of every image that does not decode: one full decode each (a truncated file fails too),
    in threads (the decoder releases the GIL). What `--skip-corrupt` leaves out before a split is used."""

    def reason(record: Record) -> str | None:
        try:
            read_image(record.path)
        except ImageReadError as exc:  # its message names the file
            return str(exc)
        except Exception as exc:  # e.g. PIL's DecompressionBombError: still one bad file, named (as decode_batch)
            return f"cannot decode image {record.path}: {type(exc).__name__}: {exc}"
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(reason, records))
    return [(r, why) for r, why in zip(records, reasons) if why is not None]


def empty_stats(model: Padim) -> GaussianStats:
    return GaussianStats.empty(
        model.n_positions, model.n_features, accumulation_dtype(model.n_positions, model.n_features)
    )


def accumulate(
    frozen: FrozenPatches, model: Padim, batches: Iterator[torch.Tensor], on_batch: Callable[[int], None]
) -> MomentAccumulator:
    """Fold every batch's patch embeddings; the first batch fixes the shift, the rest stream one batch ahead."""
    acc = MomentAccumulator(model.n_positions, model.n_features)
    first = next(batches, None)
    if first is None:
        return acc
    patches, _ = frozen(first, torch.zeros(model.n_positions, model.n_features))
    acc.add_patches(patches.numpy())
    on_batch(first.shape[0])
    for dev, total in frozen.stream(batches, torch.from_numpy(acc.shift)):
        acc.add_deviations(dev.numpy(), total.numpy())
        on_batch(dev.shape[0])
    return acc


def fit_padim(
    model: Padim,
    records: Sequence[Record],
    batch_size: int = 32,
    progress: bool = True,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> GaussianStats:
    """One pass of the frozen backbone (on `runtime`, frozen.RUNTIMES) over the normal images; memory
    independent of their number."""
    if len(records) < 2:
        raise ValueError(f"PADIM needs at least 2 training images, got {len(records)}")
    bar = Progress(len(records), "fit padim", progress)
    model.eval()
    frozen = patch_runtime(model, runtime, precision=precision)
    with torch.inference_mode(), torch_beside(frozen):
        batches = (x for _, x in iter_batches(records, model.image_size, batch_size))
        acc = accumulate(frozen, model, batches, bar.update)
        stats = gaussian_from_moments(acc, accumulation_dtype(model.n_positions, model.n_features))
        del acc, frozen  # the float32 moments and the compiled network: not needed while the Gaussians are inverted
    bar.close()
    model.set_gaussian(stats)
    return stats


def patchcore_embedder(
    model: PatchCore, runtime: str = DEFAULT_RUNTIME, threads: int | None = None, precision: str = "f32"
) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, 3, H, W) -> PatchCore's patch embeddings (B, P, D), the backbone on `runtime` (frozen.RUNTIMES)
    at `precision`."""
    net = teacher_runtime(model, runtime, threads, precision)
    if net is None:
        return model.embed
    return lambda x: model.embed_taps([net(x)[name] for name in model.extractor.layers])


def fit_patchcore(
    model: PatchCore,
    records: Sequence[Record],
    batch_size: int = 32,
    progress: bool = True,
    runtime: str = DEFAULT_RUNTIME,
    chunk_patches: int = CHUNK_PATCHES,
    precision: str = "f32",
) -> CoresetResult:
    """One pass of the frozen backbone over the normal images, their patch embeddings streamed into a coreset
    (models/coreset.py: memory O(bank + chunk), whatever the number of images); sets the model's bank."""
    if not records:
        raise ValueError("PatchCore needs at least 1 training image")
    bar = Progress(len(records), "fit patchcore", progress)
    model.eval()
    embed = patchcore_embedder(model, runtime, precision=precision)
    stream = StreamingCoreset(model.coreset_ratio, model.projection(), chunk_patches=chunk_patches)
    with torch.inference_mode():
        for _, x in iter_batches(records, model.image_size, batch_size):
            stream.add(embed(x).reshape(-1, model.n_features))
            bar.update(x.shape[0])
        result = stream.finish()
    bar.close()
    model.set_bank(result.bank)
    return result


def anomaly_maps(
    model: torch.nn.Module,
    records: Sequence[Record],
    image_size: ImageSize,
    batch_size: int = 32,
    progress: bool = True,
    what: str = "score",
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> np.ndarray:
    """(N, H, W) float32 raw anomaly maps, in record order. PADIM's frozen network runs on `runtime`
    (frozen.RUNTIMES) and its head in torch; other models run in torch."""
    out = np.empty((len(records), *as_hw(image_size)), dtype=np.float32)
    bar = Progress(len(records), what, progress)
    model.eval()
    batches = (x for _, x in iter_batches(records, image_size, batch_size))
    i = 0
    with torch.inference_mode():
        for maps in _map_stream(model, batches, runtime, precision):
            out[i : i + len(maps)] = maps[:, 0].numpy()
            i += len(maps)
            bar.update(len(maps))
    bar.close()
    return out


def _map_stream(
    model: torch.nn.Module, batches: Iterator[torch.Tensor], runtime: str, precision: str
) -> Iterator[torch.Tensor]:
    if isinstance(model, Stfpm) and runtime != "torch":
        teacher = teacher_runtime(model, runtime, precision=precision)
        yield from (anomaly_map(*model.features(x, teacher(x)), tuple(x.shape[-2:])) for x in batches)
        return
    if isinstance(model, PatchCore) and runtime != "torch":
        yield from map(map_function(model, runtime, precision), batches)
        return
    if not isinstance(model, Padim) or runtime == "torch":
        yield from (model(x) for x in batches)
        return
    frozen = patch_runtime(model, runtime, precision=precision)
    with torch_beside(frozen):
        for dev, _ in frozen.stream(batches, model.mean):
            yield model.score_deviations(dev, padim_input_size(model))


def padim_input_size(model: Padim) -> tuple[int, int]:
    return model.grid[0] * model.extractor.strides[0], model.grid[1] * model.extractor.strides[0]


def map_function(
    model: torch.nn.Module, runtime: str = DEFAULT_RUNTIME, precision: str = "f32", threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, 3, H, W) -> raw maps (B, 1, H, W), one batch at a time (a Ray scoring actor's step)."""
    if isinstance(model, PatchCore) and runtime != "torch":
        embed = patchcore_embedder(model, runtime, threads, precision)
        return lambda x: model.score_embeddings(embed(x), model.input_size())
    if not isinstance(model, Padim) or runtime == "torch":
        return model
    frozen = patch_runtime(model, runtime, threads, precision)
    return lambda x: model.score_deviations(frozen(x, model.mean)[0], padim_input_size(model))


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float | None
    images_per_s: float
    seconds: float


@dataclass
class EarlyStopping:
    """Stop when the monitored loss has not improved for `patience` epochs; remembers the best epoch."""

    patience: int
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def step(self, epoch: int, value: float) -> bool:
        """Record this epoch's value; True if it is the new best."""
        if value < self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def make_optimizer(model: Stfpm, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def stfpm_epoch(
    model: Stfpm | torch.nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """One pass of SGD over the batches; returns (mean loss per image, images seen)."""
    loss_fn = loss_fn or model.loss
    model.train()
    total, n = 0.0, 0
    for x in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        n += x.shape[0]
    return total / max(n, 1), n


def stfpm_val_loss(model: Stfpm, batches, teacher: OpenVinoTeacher | None = None) -> tuple[float, int]:
    """(mean loss per image, images seen) on held-out normal images (no anomalies needed for model selection)."""
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode():
        for x in batches:
            total += float(model.loss(x, teacher(x) if teacher else None))
            n += x.shape[0]
    return total / max(n, 1), n


BN_RECOMPUTE_MAX_IMAGES = 512  # a seeded sample; population statistics need hundreds of images, not all


def recompute_batchnorm(
    model: Stfpm,
    records: Sequence[Record],
    batch_size: int = 32,
    seed: int = 0,
    max_images: int = BN_RECOMPUTE_MAX_IMAGES,
    device: torch.device | None = None,
) -> int:
    """Replace the student's batch-norm running statistics by exact ones of its final weights.

    During training the running statistics are a moving average over batches seen with *earlier* weights
    (and a short run has taken few steps), so the eval-mode student differs from the one the loss was
    minimised with. One no-grad pass in train mode with a cumulative average (momentum None) over a seeded
    sample of at most `max_images` images (on `device`, default CPU) gives the statistics of the weights that
    are kept; the model is left in eval mode. Returns the number of images used (0: no batch norm).
    """
    bn = batchnorms(model.student)
    if not records or not bn:
        return 0
    if len(records) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(records), max_images, replace=False))
        records = [records[i] for i in idx]
    saved = [m.momentum for m in bn]
    model.eval()
    for m in bn:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for _, x in iter_batches(records, model.image_size, batch_size):
                model.student(x if device is None else x.to(device))
    finally:
        for m, momentum in zip(bn, saved):
            m.momentum = momentum
        model.eval()
    return len(records)


def batchnorms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The batch-norm layers of `module` (the student's, for STFPM)."""
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@dataclass
class StfpmResult:
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False


def train_stfpm(
    model: Stfpm,
    train: Sequence[Record],
    val: Sequence[Record],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    patience: int,
    seed: int = 0,
    progress: bool = True,
    runtime: str = DEFAULT_RUNTIME,
    precision: str = "f32",
) -> StfpmResult:
    """Train the student in-process; keep the weights of the epoch with the lowest validation loss.

    Without validation images, the last epoch's weights are kept and training runs all `epochs`. The frozen
    teacher runs on `runtime` (frozen.RUNTIMES) at `precision`, the student in torch.
    """
    optimizer = make_optimizer(model, lr, momentum, weight_decay)
    teacher = teacher_runtime(model, runtime, precision=precision)
    loss_fn = (lambda x: model.loss(x, teacher(x))) if teacher else None
    stopper = EarlyStopping(patience)
    result = StfpmResult()
    best_state = None
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        start = time.perf_counter()
        order = [train[i] for i in rng.permutation(len(train))]
        batches = (x for _, x in iter_batches(order, model.image_size, batch_size))
        train_loss, n = stfpm_epoch(model, batches, optimizer, loss_fn)
        val_batches = (x for _, x in iter_batches(val, model.image_size, batch_size))
        val_loss = stfpm_val_loss(model, val_batches, teacher)[0] if val else None
        seconds = time.perf_counter() - start
        result.history.append(EpochResult(epoch, train_loss, val_loss, n / seconds, seconds))
        if val_loss is not None and stopper.step(epoch, val_loss):
            best_state = copy.deepcopy(model.student.state_dict())
        if progress:
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}"
                + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                + f", {n / seconds:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
        if val_loss is not None and stopper.should_stop:
            result.stopped_early = True
            break
    if best_state is not None:
        model.student.load_state_dict(best_state)
        result.best_epoch = stopper.best_epoch
    else:
        result.best_epoch = len(result.history) - 1
    model.eval()
    return result
