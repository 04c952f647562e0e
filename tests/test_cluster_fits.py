"""Fits on a real two-node Ray cluster (the session's `two_nodes`: `ray start` nodes with token authentication,
3 logical CPUs each), each driven from a subprocess as a user's driver would be, with 2 CPUs per worker so that
each node holds one pool actor and both must work: PADIM's statistics equal the in-process fit's; PatchCore's
bank from 2 workers on the two nodes agrees with the in-process fit's. (Beside
test_cluster_e2e.py, so the cluster's tests run one after the other and the cluster stops after them.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fits import RTOL, rel_err, tiny_padim

from distributed_anomaly import engine, metrics, rundir
from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.mvtec import records_of_split, split_train_val

pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.slow]

# Both drivers: connect (the driver gets only the token: ensure_ray must turn token mode on itself, Ray does not
# for an explicit address), fit with 2 workers of 2 CPUs on the 3-CPU nodes, write the result and the fit's info
# with the cluster's live nodes.
PADIM_DRIVER = textwrap.dedent("""
    import json, sys
    import numpy as np, ray
    from fits import tiny_padim
    from distributed_anomaly.data.dataset import load_dataset
    from distributed_anomaly.data.mvtec import records_of_split
    from distributed_anomaly.distributed import ensure_ray, fit_padim_ray

    address, data, out = sys.argv[1:4]
    ensure_ray(address)
    train = records_of_split(load_dataset(data), "train")
    stats, info = fit_padim_ray(tiny_padim(), train, batch_size=3, workers=2, cpus_per_worker=2,
                                threads_per_worker=1, progress=False)
    np.savez(out + "/stats.npz", mean=stats.mean.numpy(), m2=stats.m2.numpy(), count=stats.count)
    info["cluster_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    json.dump(info, open(out + "/info.json", "w"))
    ray.shutdown()
""")

PATCHCORE_DRIVER = textwrap.dedent("""
    import json, sys
    import numpy as np, ray
    from distributed_anomaly import rundir
    from distributed_anomaly.data.dataset import load_dataset
    from distributed_anomaly.data.mvtec import split_train_val
    from distributed_anomaly.distributed import ensure_ray
    from distributed_anomaly.distributed.patchcore_fit import fit_patchcore_ray

    address, run, data, out = sys.argv[1:5]
    ensure_ray(address)
    cfg, tcfg, _ = rundir.load_config(run)
    _, model, _ = rundir.load_model(run)
    train, _ = split_train_val(load_dataset(data), tcfg.val_fraction, cfg.seed)  # the images the run fit on
    result, info = fit_patchcore_ray(model, train, batch_size=4, workers=2, cpus_per_worker=2,
                                     threads_per_worker=1, progress=False)
    np.save(out + "/bank.npy", result.bank.numpy())
    info.update(exact=result.exact, patches=result.patches)
    info["cluster_nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    json.dump(info, open(out + "/info.json", "w"), default=str)
    ray.shutdown()
""")


def _drive(script: str, cluster, *args: str | Path) -> dict:
    """Run `script` as a driver of the two-node cluster; its info, after checking both nodes worked."""
    out = Path(args[-1])
    tests = str(Path(__file__).parent)  # the drivers import tests/fits.py
    driver = subprocess.run(
        [sys.executable, "-c", script, cluster.address, *map(str, args)],
        env={**cluster.client_env, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert len(info["cluster_nodes"]) == 2
    assert sorted(info["nodes"]) == sorted(info["cluster_nodes"])  # both nodes ran a worker ...
    assert len(info["workers"]) == 2 and all(w["images"] > 0 for w in info["workers"])  # ... that did work
    return info


def test_padim_fit_on_two_nodes_equals_in_process(two_nodes, demo_category: Path, tmp_path: Path) -> None:
    train = records_of_split(load_dataset(demo_category), "train")
    ref = engine.fit_padim(tiny_padim(), train, batch_size=8, progress=False)
    info = _drive(PADIM_DRIVER, two_nodes, demo_category, tmp_path)
    assert info["partials"] == 2  # one per node: the driver merged both nodes' partials
    saved = np.load(tmp_path / "stats.npz")
    assert int(saved["count"]) == info["images"] == len(train)
    mean, m2 = torch.from_numpy(saved["mean"]), torch.from_numpy(saved["m2"])
    assert rel_err(mean, ref.mean) < RTOL
    assert rel_err(m2 / (len(train) - 1), ref.covariance()) < RTOL


def test_patchcore_bank_of_two_workers_across_nodes_agrees_with_the_in_process_fit(
    two_nodes, patchcore_run: Path, demo_category: Path, tmp_path: Path
) -> None:
    """Shard coresets merged by the driver: 2 workers across the cluster's two nodes, against the bank the
    in-process fit (`train`, the session's `patchcore_run`) kept. The demo's patches fit in one chunk, so both are
    the exact greedy coreset, the same set for any number of workers (the streaming reduction of shards:
    test_patchcore.py, in process): float near-ties aside, the banks agree and score alike (image AUROC within
    0.005). How the test split is then scored on Ray Data:
    test_patchcore.py::test_ray_scoring_actor_gives_the_in_process_maps."""
    _, model, _ = rundir.load_model(patchcore_run)
    cfg, tcfg, run_info = rundir.load_config(patchcore_run)
    records = load_dataset(demo_category)
    train, test = split_train_val(records, tcfg.val_fraction, cfg.seed)[0], records_of_split(records, "test")
    labels = np.array([r.label for r in test], dtype=bool)
    info = _drive(PATCHCORE_DRIVER, two_nodes, patchcore_run, demo_category, tmp_path)
    assert info["decode_in_actors"]  # as PADIM's, on nodes of few CPUs
    assert info["patches"] == run_info["coreset"]["patches"] == len(train) * model.n_positions
    assert info["images"] == len(train) and info["exact"] and run_info["coreset"]["exact"]
    banks = {"in process": model.memory_bank.clone(), "2 workers": torch.from_numpy(np.load(tmp_path / "bank.npy"))}
    expected = (math.ceil(model.coreset_ratio * info["patches"]), model.n_features)
    assert banks["2 workers"].shape == banks["in process"].shape == expected
    assert info["coreset"]["bank_size"] == run_info["coreset"]["bank_size"] == banks["2 workers"].shape[0]
    auroc = {}
    for name, bank in banks.items():
        model.set_bank(bank)
        maps = engine.anomaly_maps(model, test, model.image_size, 8, progress=False, runtime="torch")
        auroc[name] = metrics.auroc(maps.reshape(len(maps), -1).max(1), labels)
    assert abs(auroc["in process"] - auroc["2 workers"]) <= 0.005, auroc
    rows = {tuple(row) for row in banks["in process"].tolist()}
    assert len(rows & {tuple(row) for row in banks["2 workers"].tolist()}) >= 0.95 * len(rows)  # near-ties aside
