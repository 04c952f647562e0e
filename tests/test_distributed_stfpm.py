"""STFPM on Ray Train: DDP gradient semantics, batch norm per replica over epochs, a killed worker, resuming.

Tiny on purpose (resnet18 layer1+layer2 with seeded random weights, 64 px, a handful of demo images): each
Ray Train run costs a worker-group start (process start-up and imports), so the file makes four: 2 workers
for three epochs with per-replica batch norm (DDP's sharding and gradient reduction; the plain step is checked
in Ray Train's local mode, which starts no group); 2 and a restart for the failure through the CLI, then 2 for
its resume. Faults are injected with a fault hook
(faults.FaultPlan) passed to train_stfpm_ray.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ray._private import state as ray_state  # the GCS actor table: the session's Ray has no dashboard

from distributed_anomaly import engine, rundir
from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.data.loader import load_batch
from distributed_anomaly.data.mvtec import load_dataset, records_of_split
from distributed_anomaly.distributed import shards, stfpm_train
from distributed_anomaly.distributed.checkpoints import load_state
from distributed_anomaly.distributed.faults import Fault, FaultPlan
from distributed_anomaly.distributed.stfpm_train import train_stfpm_ray
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.stfpm import Stfpm, stfpm_loss

CFG = ModelConfig(model="stfpm", backbone="resnet18", layers=("layer1", "layer2"), image_size=64)


@pytest.fixture(scope="module")
def normal_images(demo_category):
    train = records_of_split(load_dataset(demo_category), "train")
    return train  # 24 normal images, in name order


def _student(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


def _local_run(tcfg: TrainConfig, fit, val, storage: Path, run_name: str, **options):
    """A new run in Ray Train's local mode (workers=0: the loop in this process), checkpoints in STORAGE/RUN_NAME."""
    options.update(storage=str(storage), run_name=run_name, resume_from=None, progress=False)
    return train_stfpm_ray(CFG, tcfg, fit, val, workers=0, **options)


def test_epoch_order_is_a_seeded_permutation_cut_into_blocks() -> None:
    """shards.shuffled_blocks: the blocks of one execution put together are every image once, in the order
    epoch_order gives for (seed, execution); another execution or seed gives another order, the same ones the
    same order."""
    from ray.data import DataContext

    paths = [f"img_{i:02d}.png" for i in range(11)]
    ctx = DataContext.get_current()
    saved = ctx._execution_idx
    try:
        orders = []
        for execution in (0, 1, 0):
            ctx._execution_idx = execution
            rows = [shards.shuffled_blocks({"block": [b]}, paths, seed=3, block_size=4) for b in range(3)]
            assert [len(r["idx"]) for r in rows] == [4, 4, 3]
            idx = [int(i) for r in rows for i in r["idx"]]
            assert sorted(idx) == list(range(11))
            assert [p for r in rows for p in r["path"]] == [paths[i] for i in idx]
            assert idx == shards.epoch_order(11, 3, execution).tolist()
            orders.append(idx)
        assert orders[0] == orders[2] and orders[0] != orders[1]
        assert shards.epoch_order(11, 4, 0).tolist() != orders[0]
        both = shards.shuffled_blocks({"block": [2, 0]}, paths, seed=3, block_size=4)  # a batch of two blocks
        assert both["idx"].tolist() == orders[0][8:] + orders[0][:4]
    finally:
        ctx._execution_idx = saved


def test_training_pipeline_reshuffles_every_epoch_and_keeps_every_image(ray_local, normal_images) -> None:
    """stfpm_train's training dataset, executed three times as Ray Train does once per epoch: each epoch holds
    every image once, the epochs' orders differ, and the same seed gives the same orders again."""
    fit = normal_images[:10]

    def epochs(seed: int) -> list[list[int]]:
        ds = stfpm_train._datasets(fit, [], 32, per_worker=4, seed=seed, decode_tasks=1)["train"]
        return [[int(i) for b in ds.iter_batches(batch_size=None) for i in b["idx"]] for _ in range(3)]

    first = epochs(0)
    assert all(sorted(order) == list(range(10)) for order in first)
    assert len({tuple(order) for order in first}) == 3
    assert first == [shards.epoch_order(10, 0, e).tolist() for e in range(3)]
    assert epochs(0) == first and epochs(1) != first


def test_local_mode_step_equals_the_in_process_step(ray_local, normal_images, tmp_path):
    """One SGD step of the Ray Train loop in Ray Train's local mode (W=0) x 8 images == the in-process step.

    The student's batch norm uses its running statistics here (batch_norm="frozen"), so the step is the plain
    one and the loop's pieces are compared: Ray Data's batches, the loss, its reported per-image value and the
    optimizer step. The same loop on 2 workers -- the sharding, DDP's gradient reduction and its scale -- is
    pinned by test_two_workers_with_replica_batch_norm_over_epochs, whose reference step is exact to ~1e-6 and
    fits one split only (one worker-group start serves both). At a world size of one a worker takes the W=0
    step (no DDP wrapper, stfpm_worker.train_loop_per_worker); a one-worker group trains end to end as the
    STFPM trial of test_tune.py's search (`tune --workers 1`, the default).
    """
    fit, val = normal_images[:8], normal_images[8:10]
    tcfg = TrainConfig(epochs=1, batch_size=8, pretrained=False)
    reference = rundir.build_model(CFG, pretrained=False)
    initial = _student(reference)
    for m in reference.student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    opt = engine.make_optimizer(reference, tcfg.lr, tcfg.momentum, tcfg.weight_decay)
    x = load_batch(fit, CFG.image_size)
    loss = stfpm_loss(reference.teacher(x), reference.student(x))
    loss.backward()
    opt.step()
    expected = _student(reference)

    model, info = _local_run(tcfg, fit, val, tmp_path, "w0", batch_norm="frozen", decode_tasks=1)
    assert info["per_worker_batch_size"] == 8 and info["workers"] == 0
    assert info["images_per_epoch"] == [8] and info["epochs_run"] == 1
    got = _student(model)
    assert not torch.equal(got["stages.s0.0.weight"], initial["stages.s0.0.weight"])
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # the reported training loss is the per-image loss before the step
    assert info["history"][0]["train_loss"] == pytest.approx(loss.item() / 8, rel=1e-4)


def _max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], keys) -> float:
    """Largest |got - want| of a tensor relative to that tensor's largest |want|, over `keys`."""
    return max(
        float((got[k].double() - want[k].double()).abs().max() / want[k].double().abs().max().clamp_min(1e-12))
        for k in keys
    )


def _restored(initial: Stfpm, state: dict | None, tcfg: TrainConfig) -> tuple[Stfpm, torch.optim.Optimizer]:
    """A copy of `initial` and its optimizer as a checkpoint left them (None: as training starts)."""
    model = copy.deepcopy(initial)
    optimizer = engine.make_optimizer(model, tcfg.lr, tcfg.momentum, tcfg.weight_decay)
    if state is not None:
        model.student.load_state_dict(state["student"])
        optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    return model, optimizer


def _ghost_bn_step(model: Stfpm, optimizer: torch.optim.Optimizer, x0: torch.Tensor, x1: torch.Tensor) -> float:
    """One process, one SGD step as two replicas take it: x0 (rank 0's images) and x1 (rank 1's) are each
    normalised by their own batch statistics, the two losses' gradients add up, and the running statistics
    are rank 0's (DDP broadcasts rank 0's buffers before every forward). Returns the summed loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    before = {k: b.clone() for k, b in model.student.named_buffers()}
    loss1 = stfpm_loss(model.teacher(x1), model.student(x1))
    loss1.backward()  # gradients accumulate: the sum of the two losses' gradients
    with torch.no_grad():
        for k, b in model.student.named_buffers():
            b.copy_(before[k])
    loss0 = stfpm_loss(model.teacher(x0), model.student(x0))
    loss0.backward()
    optimizer.step()
    return float(loss0) + float(loss1)


def test_two_workers_with_replica_batch_norm_over_epochs(ray_local, normal_images, tmp_path):
    """3 epochs, default batch norm ("replica"), 2 workers x 2 images: one step an epoch on 4 images.

    What holds (stfpm_train's docstring): every epoch's checkpoint -- weights, running statistics, momentum --
    is what one process computes from the previous epoch's checkpoint when it normalises rank 0's two images
    and rank 1's two separately ("ghost batch norm") and sums their losses, for the split Ray Data made that
    epoch (a seeded shuffle: found among the 6 possible ones, and it must be the only one that fits).
    Measured: 1e-7 to 1.3e-6 relative (float32 rounding; the next-best split is off by 1.6e-2 or more).
    The ordinary single-process step (batch 4, whole-batch statistics) is another step: measured 3.9e-2 to
    2.6e-1 relative on the weights, from the same checkpoint; over the 3 epochs of the single-process run
    (engine.train_stfpm) 0.47 on the weights and 4.9e-3 on the training loss. Both are bounded: the
    difference must be there (normalisation really per replica) and stay near the documented size.
    Each epoch starts from the run's own previous checkpoint: at lr 0.4, float32 rounding differences
    between two processes grow ~25x an epoch, so a reference carried on alone drifts (6.7e-4 by epoch 3).
    """
    fit = normal_images[16:20]
    tcfg = TrainConfig(epochs=3, batch_size=4, pretrained=False)
    initial = rundir.build_model(CFG, pretrained=False)
    storage = tmp_path / "ray_train"
    model, info = train_stfpm_ray(
        CFG,
        tcfg,
        fit,
        [],
        workers=2,
        storage=str(storage),
        run_name="replica",
        resume_from=None,
        progress=False,
        model=copy.deepcopy(initial),
        num_to_keep=3,
        decode_tasks=1,
    )
    assert info["batch_norm"] == "replica" and info["per_worker_batch_size"] == 2
    # On the local Ray that ensure_ray started, Ray Train starts no preemption watcher (ray_setup): its actor table
    # holds this run's controller and workers, and no PreemptionWatcher.
    classes = {a["ActorClassName"] for a in ray_state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= classes and "PreemptionWatcher" not in classes
    # 2 input blocks of 2 shuffle into 2 blocks of 2: each rank 2 images, one step, no empty step
    assert info["images_per_epoch"] == [4, 4, 4] and info["empty_steps_per_epoch"] == [0, 0, 0]
    states = {s["epoch"]: s for s in (load_state(p.parent) for p in (storage / "replica").glob("*/state.pt"))}
    assert sorted(states) == [0, 1, 2], f"checkpoints kept: {sorted(states)}"
    x = load_batch(fit, CFG.image_size)
    keys = list(initial.student.state_dict())
    params = [k for k, _ in initial.student.named_parameters()]
    step_gaps = []
    for epoch in range(3):
        want = states[epoch]
        tried = []
        for rank0 in itertools.combinations(range(4), 2):
            m, o = _restored(initial, states.get(epoch - 1), tcfg)
            loss = _ghost_bn_step(m, o, x[list(rank0)], x[[i for i in range(4) if i not in rank0]])
            momentum = {k: v["momentum_buffer"] for k, v in o.state_dict()["state"].items()}
            tried.append((_max_rel_diff(m.student.state_dict(), want["student"], keys), loss, momentum))
        tried.sort(key=lambda t: t[0])
        (fits, loss, momentum), runner_up = tried[0], tried[1][0]
        assert fits < 1e-4 < runner_up, f"epoch {epoch}: no single split fits ({[f'{t[0]:.1e}' for t in tried]})"
        assert info["history"][epoch]["train_loss"] == pytest.approx(loss / 4, rel=1e-5)
        got = {k: v["momentum_buffer"] for k, v in want["optimizer"]["state"].items()}
        assert _max_rel_diff(got, momentum, list(momentum)) < 1e-4
        m, o = _restored(initial, states.get(epoch - 1), tcfg)
        engine.stfpm_epoch(m, [x], o)  # the whole batch's statistics instead
        step_gaps.append(_max_rel_diff(m.student.state_dict(), want["student"], params))
        print(
            f"epoch {epoch}: ghost batch norm fits {fits:.1e} (next split {runner_up:.1e}), "
            f"whole batch {step_gaps[-1]:.1e}"
        )
    assert _max_rel_diff(model.student.state_dict(), states[2]["student"], keys) == 0  # no val: the last epoch

    whole = copy.deepcopy(initial)
    result = engine.train_stfpm(
        whole,
        fit,
        [],
        epochs=3,
        batch_size=4,
        lr=tcfg.lr,
        momentum=tcfg.momentum,
        weight_decay=tcfg.weight_decay,
        patience=tcfg.patience,
        progress=False,
    )
    weights = _max_rel_diff(model.student.state_dict(), whole.student.state_dict(), params)
    losses = max(abs(a["train_loss"] - b.train_loss) / b.train_loss for a, b in zip(info["history"], result.history))
    print(
        f"replica vs whole-batch batch norm: per step {min(step_gaps):.1e}-{max(step_gaps):.1e}, after 3 "
        f"epochs: weights {weights:.1e}, train loss {losses:.1e}"
    )
    assert min(step_gaps) > 1e-2, step_gaps
    assert weights < 1.0 and losses < 2e-2, (weights, losses)


def test_in_process_run_resumes(ray_local, normal_images, tmp_path):
    """workers=0 (Ray Train local mode) keeps its own checkpoints and resumes the same way."""
    fit, val = normal_images[:6], normal_images[12:14]
    tcfg = TrainConfig(epochs=4, batch_size=6, pretrained=False)
    fail = FaultPlan((Fault(rank=0, epoch=2, action="raise", marker=str(tmp_path / "interrupted")),))
    with pytest.raises(RuntimeError, match="resume_from"):
        _local_run(tcfg, fit, val, tmp_path, "run", fault_hook=fail)
    assert (tmp_path / "interrupted").is_file()
    with pytest.raises(UserError, match="already exists"):
        _local_run(tcfg, fit, val, tmp_path, "run")
    with pytest.raises(UserError, match="workers=0"):  # a checkpoint kind the other mode cannot continue
        train_stfpm_ray(CFG, tcfg, fit, val, workers=1, resume_from=str(tmp_path / "run"), progress=False)
    model, info = train_stfpm_ray(CFG, tcfg, fit, val, workers=0, resume_from=str(tmp_path / "run"), progress=False)
    assert info["resumes"] == 1 and info["failures"] == 0
    assert [h["epoch"] for h in info["history"]] == [0, 1, 2, 3]
    assert info["images_per_epoch"] == [6] * 4
    kept = sorted(p.name for p in (tmp_path / "run").glob("checkpoint_epoch*"))
    assert len(kept) <= 3 and "checkpoint_epoch0003" in kept  # num_to_keep=2 best + the latest
    _check_best(model, info, val)


def _check_best(model, info, val) -> None:
    """The returned model is the best epoch's: its validation loss is the recorded minimum."""
    losses = [h["val_loss"] for h in info["history"]]
    assert info["best_epoch"] == losses.index(min(losses)) and info["best_val_loss"] == min(losses)
    with torch.inference_mode():
        assert model.loss(load_batch(val, CFG.image_size)).item() / len(val) == pytest.approx(min(losses), rel=1e-4)


@pytest.mark.timeout(600)  # two runs of 2 workers (the first restarts once), each its own worker-group start
def test_killed_worker_restarts_then_the_interrupted_cli_run_resumes(
    ray_local, demo_category, tmp_path, monkeypatch, capsys, s3_bucket
):
    """`train --workers 2 --max-failures 1 --storage s3://... --skip-corrupt`, as a user runs it.

    Rank 1 is SIGKILLed at the start of epoch 1: Ray Train restarts the group from epoch 0's checkpoint
    (max_failures=1). Rank 0 is SIGKILLed at the start of epoch 2: no retries left, the command fails naming
    `train --resume RUN_DIR`, which finishes the run from the checkpoints Ray Train wrote to S3: each epoch once,
    the best epoch's model kept, the finished run directory uploaded. --skip-corrupt holds on Ray Train too (and
    survives the resume): a truncated training image and a truncated test image are left out and listed in
    metrics.json. (On a shared machine Ray's memory monitor may kill a worker too: that is one more failure, so
    only the first injected kill is asserted to have happened; the run fails and resumes all the same.)"""
    from distributed_anomaly import storage
    from distributed_anomaly.cli import main

    out = tmp_path / "run"
    shared = s3_bucket("cli-resume")
    data = shutil.copytree(demo_category, tmp_path / "data")
    records = load_dataset(data)
    bad_train = records_of_split(records, "train")[3].path
    bad_test = next(r.path for r in records_of_split(records, "test") if r.label)
    for bad in (bad_train, bad_test):
        Path(bad).write_bytes(Path(bad).read_bytes()[:200])
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "stfpm",
        "--no-pretrained",
        "--layers",
        "layer1,layer2",
        "--image-size",
        "64",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--workers",
        "2",
        "--max-failures",
        "1",
        "--storage",
        shared,
        "--skip-corrupt",
        "--quiet",
    ]
    markers = [tmp_path / "killed_rank1_epoch1", tmp_path / "killed_rank0_epoch2"]
    faults = FaultPlan(
        (
            Fault(rank=1, epoch=1, action="kill", marker=str(markers[0])),
            Fault(rank=0, epoch=2, action="kill", marker=str(markers[1])),
        )
    )
    # The CLI takes no fault hook: the first call's train_stfpm_ray (looked up when training starts) gets one.
    with monkeypatch.context() as patch:
        patch.setattr(stfpm_train, "train_stfpm_ray", functools.partial(train_stfpm_ray, fault_hook=faults))
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert markers[0].is_file(), f"the first fault was never injected:\n{err[-3000:]}"
    assert f"train --resume {out}" in err
    assert (out / rundir.REQUEST).is_file() and not (out / rundir.CONFIG).exists()
    assert main(argv) == 2  # an interrupted run is neither silently restarted nor overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "5"]) == 2  # the arguments are the run's own
    assert "drop --epochs" in capsys.readouterr().err

    checkpoints = storage.join(shared, "run", "ray_train")  # STORAGE/<RUN_DIR name>/ray_train, not RUN_DIR
    assert storage.exists(checkpoints) and not (out / "ray_train").exists()
    assert not storage.exists(storage.join(shared, "run", rundir.CONFIG))  # uploaded only when finished

    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    _, _, info = rundir.load_config(out)
    ray_info = info["ray_train"]
    assert ray_info["run_path"].startswith(checkpoints.split("?")[0] + "/stfpm-")
    assert ray_info["failures"] >= 1 and ray_info["resumes"] == 1 and ray_info["resumed"]
    history = json.loads((out / rundir.HISTORY).read_text())
    assert info["epochs_run"] == 3 and [h["epoch"] for h in history] == [0, 1, 2]  # each epoch once
    assert ray_info["images_per_epoch"] == [info["num_train_images"]] * 3
    assert ray_info["per_worker_batch_size"] == 4 and ray_info["global_batch_size"] == 8
    losses = [h["val_loss"] for h in history]
    assert info["best_epoch"] == losses.index(min(losses))  # the best epoch's model, not the last one's
    fetched = storage.download(storage.join(shared, "run"), tmp_path / "fetched")
    assert (fetched / rundir.CONFIG).read_bytes() == (out / rundir.CONFIG).read_bytes()
    assert info["batchnorm_recomputed_on"] == info["num_train_images"]
    assert info["num_train_images"] + info["num_val_images"] == len(records_of_split(records, "train")) - 1
    metrics = json.loads((out / rundir.METRICS).read_text())
    skipped = metrics["skipped_images"]
    assert skipped["train"] + skipped["validation"] == [bad_train] and skipped["test"] == [bad_test]
    assert metrics["num_test_images"] == len(records_of_split(records, "test")) - 1
    assert main(["train", "--resume", str(out)]) == 2  # finished: nothing to resume
    assert "finished run" in capsys.readouterr().err


def test_epoch_checkpoint_and_fault_modules_import_no_ray():
    """The pure pieces of the Ray glue (the epoch, checkpoints, fault hooks, payloads, CPU budget) are torch only:
    importing them -- and the distributed package -- leaves Ray out of the process."""
    modules = ", ".join(
        f"distributed_anomaly.distributed.{m}" for m in ("stfpm_steps", "checkpoints", "faults", "payload", "cpus")
    )
    code = f"import sys, {modules}; assert not [m for m in sys.modules if m.split('.')[0] == 'ray'], 'ray imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_each_rank_restores_from_its_own_copy_of_a_remote_checkpoint(s3_bucket, tmp_path):
    """Ray's Checkpoint.as_directory() shares one download per node between the node's ranks, and a rank arriving
    after the download re-downloads into the folder another rank is reading (a restart from S3 once failed on a
    half-rewritten state.pt). Each rank gets a private copy of a remote checkpoint, removed afterwards; a local
    checkpoint is read in place."""
    import pyarrow.fs
    from ray.train import Checkpoint

    from distributed_anomaly.distributed.stfpm_worker import _private_copy

    src = tmp_path / "checkpoint"
    src.mkdir()
    (src / "state.pt").write_bytes(bytes(range(256)) * 64)
    fs, path = pyarrow.fs.FileSystem.from_uri(s3_bucket("restore-copy"))
    pyarrow.fs.copy_files(str(src), path, destination_filesystem=fs)
    remote = Checkpoint(path, filesystem=fs)
    with _private_copy(remote) as rank0, _private_copy(remote) as rank1:
        assert rank0 != rank1 and remote._get_temporary_checkpoint_dir() not in (rank0, rank1)
        for folder in (rank0, rank1):
            assert (Path(folder) / "state.pt").read_bytes() == (src / "state.pt").read_bytes()
    assert not Path(rank0).exists() and not Path(rank1).exists()
    with _private_copy(Checkpoint.from_directory(str(src))) as local:
        assert local == str(src)
