"""How well did a search's objectives track the real one? Re-scores every completed trial of a TUNE_DIR.

    .venv/bin/python bench/tune_objective_tracking.py TUNE_DIR [TUNE_DIR ...] [--json out.json]

Every completed trial keeps its run directory (its Tune checkpoint), so nothing is retrained: for each trial
this prints val_auroc and synthetic_auroc as the search measured them (search_metrics.json), and the image
AUROC of the same model on the held-out part of the test split (never seen by the search) and on the whole
test split; then Spearman rank correlations between them, and the held-out AUROC of the trial each objective
would have picked. Used for the README's "how well synthetic_auroc tracked val_auroc".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distributed_anomaly import engine, metrics, rundir  # noqa: E402
from distributed_anomaly.fileio import read_json  # noqa: E402
from distributed_anomaly.tuning.request import EXPERIMENT, REQUEST, SEARCH_METRICS, TuneRequest  # noqa: E402
from distributed_anomaly.tuning.split import prepare_data  # noqa: E402


def image_auroc(model, records, image_size: int) -> float | None:
    labels = np.array([r.label for r in records], dtype=bool)
    if labels.all() or not labels.any():
        return None
    maps = engine.anomaly_maps(model, records, image_size, 16, progress=False)
    return float(metrics.auroc(maps.reshape(len(maps), -1).max(1).astype(np.float64), labels))


def rescore(tune_dir: Path) -> dict:
    request = TuneRequest.from_dict(read_json(tune_dir / REQUEST))
    data = prepare_data(request)
    rows = []
    for ckpt in sorted((tune_dir / EXPERIMENT).glob("trial_*/checkpoint_*")):
        if not (ckpt / SEARCH_METRICS).is_file():
            continue
        cfg, model, _ = rundir.load_model(ckpt)
        found = read_json(ckpt / SEARCH_METRICS)
        rows.append(
            {
                "trial": ckpt.parent.name.removeprefix("trial_"),
                "model": cfg.model,
                "layers": ",".join(cfg.layers),
                "image_size": cfg.image_size,
                "val_auroc": found.get("val_auroc"),
                "synthetic_auroc": found.get("synthetic_auroc"),
                "heldout_auroc": image_auroc(model, data.heldout, cfg.image_size),
                "test_auroc": image_auroc(model, data.test, cfg.image_size),
            }
        )
    out = {
        "tune_dir": str(tune_dir),
        "objective": request.objective,
        "trials": rows,
        "search_images": len(data.search_part),
        "heldout_images": len(data.heldout),
    }
    pairs = [
        ("synthetic_auroc", "val_auroc"),
        ("synthetic_auroc", "heldout_auroc"),
        ("val_auroc", "heldout_auroc"),
        ("synthetic_auroc", "test_auroc"),
    ]
    out["spearman"] = {}
    for a, b in pairs:
        xs = [(r[a], r[b]) for r in rows if r[a] is not None and r[b] is not None]
        if len(xs) >= 3 and len({x for x, _ in xs}) > 1 and len({y for _, y in xs}) > 1:
            out["spearman"][f"{a} ~ {b}"] = round(float(spearmanr(*zip(*xs)).statistic), 3)
    for key in ("val_auroc", "synthetic_auroc"):
        ranked = [r for r in rows if r[key] is not None]
        if ranked:
            pick = max(ranked, key=lambda r: r[key])  # first among ties, as the search's table order
            out[f"picked_by_{key}"] = {"trial": pick["trial"], "heldout_auroc": pick["heldout_auroc"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tune_dirs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="write the results here too")
    a = ap.parse_args()
    results = [rescore(d) for d in a.tune_dirs]
    for res in results:
        print(
            f"\n{res['tune_dir']} (objective {res['objective']}; search part {res['search_images']} images, "
            f"held-out part {res['heldout_images']})"
        )
        cols = ("trial", "model", "layers", "image_size", "val_auroc", "synthetic_auroc", "heldout_auroc", "test_auroc")
        print("  ".join(f"{c:>15}" for c in cols))
        for r in sorted(res["trials"], key=lambda r: -(r["val_auroc"] or r["synthetic_auroc"] or 0)):
            print("  ".join(f"{r[c]:>15.4f}" if isinstance(r[c], float) else f"{r[c]!s:>15}" for c in cols))
        print("Spearman:", json.dumps(res["spearman"]))
        for key in ("val_auroc", "synthetic_auroc"):
            if f"picked_by_{key}" in res:
                print(f"picked by {key}: {res[f'picked_by_{key}']}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
