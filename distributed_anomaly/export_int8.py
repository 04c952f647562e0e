"""int8 export: NNCF post-training quantization of the backbone, thresholds refitted on the quantised maps; and
the bf16 check of `export --precision auto` (bf16_check), which reads the run's data the same way.

int8  NNCF post-training quantization (MIXED preset) of the backbone convolutions only, calibrated on
      the run's normal training images plus one synthetic-defect copy of each (see calibration_batches);
      the anomaly head (PADIM's gather, Mahalanobis matmul and blur; STFPM's normalised differences and
      product) stays in float, since 8-bit activations there swamp the differences it measures. Not
      pixel-exact: image scores measured within ~10 % (tested 15 %), normal images biased slightly up by
      quantization noise; image AUROC within 0.01 (same near-tie rule). That bias would move labels
      under the torch thresholds, so an int8 export refits thresholds and normalisation on its own maps
      of the run's calibration images, by the training rule (see `recalibrate`; user thresholds kept):
      int8 postprocess.json differs from the run's, fp32/fp16 copy it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from distributed_anomaly import rundir
from distributed_anomaly.calibration import calibrate
from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.decode import normalise, read_image
from distributed_anomaly.data.layout import DataLayout
from distributed_anomaly.data.loader import iter_batches
from distributed_anomaly.data.mvtec import Record, records_of_split, split_train_val
from distributed_anomaly.data.sizes import ImageSize, as_hw
from distributed_anomaly.data.synthetic import paste_patches
from distributed_anomaly.errors import UserError
from distributed_anomaly.irformat import BF16_MAX_AUROC_CHANGE, INPUT_NAME
from distributed_anomaly.metrics import auroc


def run_data(
    run_dir: Path, data: str | os.PathLike | None, layout: DataLayout | None, require_test: bool
) -> list[Record]:
    """The manifest of `data` read as `layout`, or by default of the run's own data read as it was trained."""
    info = rundir.load_config(run_dir)[2]
    if not data:
        data, layout = info.get("data"), DataLayout.from_dict(info.get("data_layout"))
    if not data:
        raise UserError(f"{run_dir} does not record its training data; int8 calibration needs it (pass --data)")
    if not Path(data).is_dir():
        raise UserError(
            f"int8 calibration needs the run's training images, but {data} (recorded in "
            f"{run_dir / rundir.CONFIG}) does not exist; pass --data"
        )
    return load_dataset(data, layout, require_test=require_test)


def bf16_check(ov_model, run_dir: Path, cfg, data: str | os.PathLike | None, layout: DataLayout | None) -> dict:
    """Image AUROC of the exported network on the run's test images computed in f32 and in bf16 (compiled for this
    CPU; one without bf16 computes in f32), and the choice: bf16 when the CPU computes in it and the AUROC moves by
    at most BF16_MAX_AUROC_CHANGE, else fp32."""
    import openvino as ov

    from distributed_anomaly.frozen_ir import compiled_precision

    batch_size = rundir.load_config(run_dir)[1].batch_size
    test = records_of_split(run_data(run_dir, data, layout, require_test=True), "test")
    labels = np.array([r.label for r in test])
    out: dict = {"images": len(test), "max_auroc_change": BF16_MAX_AUROC_CHANGE}
    for hint in ("f32", "bf16"):
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        scores = np.concatenate(
            [
                np.array(compiled({INPUT_NAME: x.numpy()})[0]).reshape(len(x), -1).max(1)
                for _, x in iter_batches(test, cfg.image_size, batch_size)
            ]
        )
        out[f"auroc_{hint}"] = round(auroc(scores, labels), 6)
        out[f"compiled_{hint}"] = compiled_precision(compiled)
    out["auroc_change"] = round(abs(out["auroc_bf16"] - out["auroc_f32"]), 6)
    within = out["auroc_change"] <= BF16_MAX_AUROC_CHANGE
    out["chosen"] = "bf16" if out["compiled_bf16"] == "bf16" and within else "fp32"
    return out


def calibration_batches(
    run_dir: Path,
    image_size: ImageSize,
    n: int,
    data: str | os.PathLike | None,
    seed: int = 0,
    layout: DataLayout | None = None,
) -> list[np.ndarray]:
    """int8 calibration data: up to n of the run's normal training images, each also with synthetic defects.

    Activation ranges fitted on normal images alone clip what anomalies produce: on the demo washer that
    halved PADIM's anomalous image scores. One copy of each image with random pasted patches (flat colour
    or noise) widens the ranges to cover anomalous inputs. (1, 3, H, W) float32 batches, 2 per image.
    """
    if n < 1:
        raise UserError(f"calibration_images must be >= 1, got {n}")
    train = records_of_split(run_data(run_dir, data, layout, require_test=False), "train")
    # Evenly spaced over the manifest, so a subset still covers the whole set (sorted file names).
    pick = np.unique(np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int))
    rng = np.random.default_rng(seed)
    out = []
    for i in pick:
        img = read_image(train[i].path)
        out += [normalise(img, image_size), normalise(paste_patches(img, rng)[0], image_size)]
    return out


def backbone_only_ignored_scope(ov_model) -> list[str]:
    """Names of every op outside the CNN backbone(s): the anomaly head stays in float.

    The backbone is what feeds a multi-channel (Group)Convolution, plus those convolutions; everything else
    (PADIM's channel gather, Mahalanobis matmul and blur convolutions; STFPM's feature normalisation,
    differences and product over layers; resizes) computes small differences of features or distances
    that 8-bit activations would swamp.
    """
    ops = ov_model.get_ordered_ops()
    keep: set[str] = set()
    stack = [
        op
        for op in ops
        if op.get_type_name() in ("Convolution", "GroupConvolution")
        and op.get_output_partial_shape(0)[1].is_static
        and op.get_output_partial_shape(0)[1].get_length() > 1
    ]
    while stack:
        op = stack.pop()
        name = op.get_friendly_name()
        if name in keep:
            continue
        keep.add(name)
        stack += [v.get_node() for v in op.input_values()]
    skip = ("Constant", "Parameter", "Result")
    return [
        op.get_friendly_name() for op in ops if op.get_type_name() not in skip and op.get_friendly_name() not in keep
    ]


def quantize_int8(ov_model, calibration: list[np.ndarray]):
    """NNCF post-training quantization of the backbone convolutions; the anomaly head stays float."""
    try:
        import nncf
    except ImportError as exc:
        raise UserError("int8 export needs NNCF: pip install nncf") from exc
    ignored = nncf.IgnoredScope(names=backbone_only_ignored_scope(ov_model), validate=False)
    nncf_logger = logging.getLogger("nncf")  # its INFO lines (one per ignored op) go to stdout
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)
    try:
        return nncf.quantize(
            ov_model,
            nncf.Dataset(calibration),
            subset_size=len(calibration),
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=ignored,
        )
    finally:
        nncf_logger.setLevel(level)


def recalibrate(
    ov_model, run_dir: Path, cfg, old_post, data: str | os.PathLike | None, layout: DataLayout | None = None
):
    """Thresholds and normalisation refitted on the quantized model's own maps, by the training rule.

    int8 shifts normal scores (quantization noise adds Mahalanobis distance): with the torch thresholds
    a third of the demo washer's test images changed label. The run's calibration images are rebuilt
    exactly as `train` chose them (same split seed and fraction; test split for --calibrate-on-test);
    user-set thresholds stay as they are.
    """
    import openvino as ov

    tcfg = rundir.load_config(run_dir)[1].resolved(cfg.model)
    records = run_data(run_dir, data, layout, require_test=tcfg.calibrate_on_test)
    fit_records, val = split_train_val(records, tcfg.val_fraction, cfg.seed)
    calib = records_of_split(records, "test") if tcfg.calibrate_on_test else val
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def score(recs, what: str) -> np.ndarray:  # calibration.Scorer: the quantized model's raw maps
        maps = [
            np.array(compiled({INPUT_NAME: x.numpy()})[0][:, 0])
            for _, x in iter_batches(recs, cfg.image_size, tcfg.batch_size)
        ]
        return np.concatenate(maps) if maps else np.zeros((0, *as_hw(cfg.image_size)), np.float32)

    post = calibrate(None, cfg, tcfg, calib, fit_records, progress=False, score=score)
    post.min_region_fraction = old_post.min_region_fraction
    post.extra = {
        **post.extra,
        "recalibrated_for": "int8",
        "torch_image_threshold": old_post.image_threshold,
        "torch_pixel_threshold": old_post.pixel_threshold,
    }
    return post
