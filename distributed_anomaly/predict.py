"""`predict`: score images with a saved model; a JSON per image and a PNG overlay of heatmap, mask and boxes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from distributed_anomaly import rundir
from distributed_anomaly.data.images import is_image_file, read_image, to_tensor
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.fileio import atomic_write, write_json
from distributed_anomaly.postprocess import TASKS, PostProcessor, Prediction



def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders searched recursively for images, in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q.name))
            if not found:
                raise UserError(f"folder {p} holds no images")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"no such image or folder: {p}")
    if not paths:
        raise UserError("no images given")
    return paths


def resize_map(raw_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a model-resolution map back to the original image size."""
    if raw_map.shape == shape:
        return raw_map
    t = torch.from_numpy(np.ascontiguousarray(raw_map))[None, None]
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


@runtime_checkable
class ModelRunner(Protocol):
    """What scoring needs from a runtime (torch module, OpenVINO IR, ...); post-processing is shared.

    `raw_maps` takes the (B, 3, S, S) float32 ImageNet-normalised batch of `data.images.to_tensor` and
    returns the (B, S, S) float32 raw anomaly maps.
    """

    image_size: int
    postprocessor: PostProcessor

    def raw_maps(self, batch: torch.Tensor) -> np.ndarray: ...


class TorchRunner:
    """A torch module (PADIM or STFPM) as a ModelRunner."""

    def __init__(self, model: torch.nn.Module, postprocessor: PostProcessor, image_size: int) -> None:
        self.model = model.eval()
        self.postprocessor = postprocessor
        self.image_size = int(image_size)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> "TorchRunner":
        cfg, model, post = rundir.load_model(run_dir)
        return cls(model, post, cfg.image_size)

    def raw_maps(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch)[:, 0].numpy()


def is_ir_dir(path: str | os.PathLike) -> bool:
    """An exported OpenVINO folder (model.xml inside) rather than a run directory."""
    return (Path(path) / "model.xml").is_file()


def load_runner(model_dir: str | os.PathLike, num_threads: int | None = None) -> ModelRunner:
    """A run directory gives the torch runner, an exported IR folder (model.xml) the OpenVINO one."""
    if is_ir_dir(model_dir):
        from distributed_anomaly.inference import OpenVINOInferencer

        return OpenVINOInferencer(model_dir, num_threads=num_threads)
    if num_threads is not None:
        if num_threads < 1:
            raise UserError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    return TorchRunner.from_run(model_dir)


def predict_images(runner: ModelRunner, images: Sequence[np.ndarray]) -> list[Prediction]:
    """The one scoring path of every runtime: to_tensor -> raw maps -> resize to each image -> post-process.

    Predictions are in each image's own coordinates (maps resized back before masks and boxes).
    """
    if len(images) == 0:
        return []
    maps = runner.raw_maps(to_tensor(list(images), runner.image_size))
    return [runner.postprocessor(resize_map(m, img.shape[:2])) for m, img in zip(maps, images)]


def predict_arrays(model: torch.nn.Module, post: PostProcessor, images: Sequence[np.ndarray],
                   image_size: int) -> list[Prediction]:
    """Torch predictions in each image's own coordinates (see predict_images)."""
    return predict_images(TorchRunner(model, post, image_size), images)


_JET = None


def heatmap_rgb(norm_map: np.ndarray) -> np.ndarray:
    """A [0, 1] map as a jet-coloured uint8 RGB image."""
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    return _JET[np.clip((norm_map * 255).round(), 0, 255).astype(np.uint8)]


def render_overlay(image: np.ndarray, pred: Prediction, task: str) -> Image.Image:
    """Image | heatmap blend with mask outline and boxes, side by side."""
    heat = (0.5 * image + 0.5 * heatmap_rgb(pred.anomaly_map)).astype(np.uint8)
    if task == "segmentation" and pred.mask is not None and pred.mask.any():
        from scipy import ndimage

        edge = pred.mask & ~ndimage.binary_erosion(pred.mask, iterations=max(1, image.shape[0] // 256))
        heat[edge] = (255, 255, 255)
    right = Image.fromarray(heat)
    if task in ("detection", "segmentation"):
        draw = ImageDraw.Draw(right)
        for x1, y1, x2, y2, s in pred.boxes:
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 0, 0), width=max(1, image.shape[0] // 200))
            draw.text((x1 + 2, y1 + 1), f"{s:.2f}", fill=(255, 0, 0))
    canvas = Image.new("RGB", (image.shape[1] * 2, image.shape[0]))
    canvas.paste(Image.fromarray(image), (0, 0))
    canvas.paste(right, (image.shape[1], 0))
    return canvas


def _save_png(path: Path, img: Image.Image) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def predict(model_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
            task: str = "segmentation", batch_size: int = 8, num_threads: int | None = None) -> list[dict]:
    """Score every image; write OUT/<name>.json, OUT/<name>_overlay.png (and _mask.png for segmentation).

    MODEL_DIR is a run directory (torch) or a folder written by `export` (OpenVINO, detected by its
    model.xml); both go through the same pre- and post-processing.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    runner = load_runner(model_dir, num_threads)
    paths = collect_images(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    names = _unique_names(paths)
    for start in range(0, len(paths), batch_size):
        chunk, chunk_names, images = [], [], []
        for p, name in zip(paths[start: start + batch_size], names[start: start + batch_size]):
            try:
                images.append(read_image(p))
            except ImageReadError as exc:  # one bad file must not lose the other results
                results.append({"image": str(p), "task": task, "error": str(exc)})
                continue
            chunk.append(p)
            chunk_names.append(name)
        if not images:
            continue
        for p, name, img, pred in zip(chunk, chunk_names, images, predict_images(runner, images)):
            record = {"image": str(p), "task": task, **pred.to_json(task)}
            if task == "segmentation" and pred.mask is not None:
                _save_png(out / f"{name}_mask.png", Image.fromarray(pred.mask.astype(np.uint8) * 255))
                record["mask"] = f"{name}_mask.png"
            _save_png(out / f"{name}_overlay.png", render_overlay(img, pred, task))
            record["overlay"] = f"{name}_overlay.png"
            write_json(out / f"{name}.json", record)
            results.append(record)
    return results


def _unique_names(paths: Iterable[Path]) -> list[str]:
    """Output stems that never collide (test/scratch/000.png and test/good/000.png both exist in MVTec)."""
    paths = list(paths)
    stems = [p.stem for p in paths]
    names, used = [], set()
    for p, stem in zip(paths, stems):
        name = f"{p.parent.name}_{stem}" if stems.count(stem) > 1 else stem
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names.append(name)
    return names
