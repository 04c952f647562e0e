"""`predict`: score images with a saved model; a JSON per image and a PNG overlay of heatmap, mask and boxes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distributed_anomaly.data.images import is_image_file, load_image
from distributed_anomaly.errors import ImageReadError, UserError
from distributed_anomaly.fileio import atomic_write, write_json
from distributed_anomaly.inference import OpenVINOInferencer
from distributed_anomaly.irformat import is_ir_dir
from distributed_anomaly.postprocess import TASKS
from distributed_anomaly.runner import ModelRunner, predict_images
from distributed_anomaly.torch_runner import TorchRunner
from distributed_anomaly.visualize import render_overlay


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


def load_runner(
    model_dir: str | os.PathLike, num_threads: int | None = None, precision: str | None = None
) -> ModelRunner:
    """A run directory gives the torch runner, an exported IR folder (model.xml) the OpenVINO one (computing at
    `precision`, default the export's)."""
    if is_ir_dir(model_dir):
        return OpenVINOInferencer(model_dir, num_threads=num_threads, precision=precision)
    if precision not in (None, "f32"):
        raise UserError(f"--precision {precision} applies to an exported IR; a run directory scores in torch (f32)")
    if num_threads is not None:
        if num_threads < 1:
            raise UserError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    return TorchRunner.from_run(model_dir)


def _save_png(path: Path, img: Image.Image) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def predict(
    model_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    task: str = "segmentation",
    batch_size: int = 8,
    num_threads: int | None = None,
    max_pixels: int | None = None,
    precision: str | None = None,
) -> list[dict]:
    """Score every image; write OUT/<name>.json, OUT/<name>_overlay.png (and _mask.png for segmentation).

    MODEL_DIR is a run directory (torch) or a folder written by `export` (OpenVINO, detected by its
    model.xml); both go through the same pre- and post-processing. An image over `max_pixels` (default
    data.limits) or that cannot be decoded gets an error record naming it; the others are still scored.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    runner = load_runner(model_dir, num_threads, precision)
    paths = collect_images(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    names = _unique_names(paths)
    for start in range(0, len(paths), batch_size):
        chunk, chunk_names, images, shapes = [], [], [], []
        for p, name in zip(paths[start : start + batch_size], names[start : start + batch_size]):
            try:
                pixels, shape = load_image(p, max_pixels=max_pixels, target_size=runner.image_size)
            except ImageReadError as exc:  # one bad file must not lose the other results
                results.append({"image": str(p), "task": task, "error": str(exc)})
                continue
            chunk.append(p)
            chunk_names.append(name)
            images.append(pixels)
            shapes.append(shape)
        if not images:
            continue
        preds = predict_images(runner, images, shapes)
        for p, name, img, shape, pred in zip(chunk, chunk_names, images, shapes, preds):
            record = {"image": str(p), "task": task, **pred.to_json(task)}
            if task == "segmentation" and pred.mask is not None:
                _save_png(out / f"{name}_mask.png", Image.fromarray(pred.mask.astype(np.uint8) * 255))
                record["mask"] = f"{name}_mask.png"
            _save_png(out / f"{name}_overlay.png", render_overlay(_full_size(img, shape), pred, task))
            record["overlay"] = f"{name}_overlay.png"
            write_json(out / f"{name}.json", record)
            results.append(record)
    return results


def _full_size(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A reduced-scale JPEG decode back at the image's own size, for the overlay (drawn in image coordinates)."""
    if pixels.shape[:2] == tuple(shape):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((shape[1], shape[0]), Image.BILINEAR))


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
