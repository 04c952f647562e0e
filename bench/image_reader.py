"""The image reader on large inputs: wall time and peak memory of decoding a large JPEG in full vs at reduced scale
for a small model (data.images.load_image with target_size), and of refusing a header-only 13000 x 13000 PNG.

Each case runs in a fresh Python process (imports done before the clock starts), so its peak RSS is its own:

    .venv/bin/python bench/image_reader.py --width 6000 --height 4000 --target 256 --repeat 5
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from bad_images import header_only_png  # noqa: E402

# Peak RSS from VmHWM (this process's own address space; ru_maxrss would carry the parent's peak across exec).
CASE = """
import json, sys, time
from distributed_anomaly.data import images
from distributed_anomaly.errors import ImageTooLargeError
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
path, target, repeat = sys.argv[1], (int(sys.argv[2]) or None), int(sys.argv[3])
base = hwm_mb()
times, shape, refused = [], None, False
for _ in range(repeat):
    start = time.perf_counter()
    try:
        pixels, _ = images.load_image(path, target_size=target)
        shape = list(pixels.shape)
    except ImageTooLargeError:
        refused = True
    times.append(time.perf_counter() - start)
peak = hwm_mb()
print(json.dumps({"median_s": round(sorted(times)[len(times) // 2], 5), "decoded_shape": shape, "refused": refused,
                  "peak_rss_mb": round(peak), "peak_growth_over_imports_mb": round(peak - base)}))
"""


def run_case(path: Path, target: int, repeat: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CASE, str(path), str(target), str(repeat)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--target", type=int, default=256, help="model input side for the reduced-scale decode")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        yy, xx = np.mgrid[0 : a.height, 0 : a.width]
        rgb = np.dstack([xx % 251, yy % 241, (xx // 7 + yy // 5) % 256]).astype(np.uint8)
        jpeg = Path(tmp) / "large.jpg"
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        jpeg.write_bytes(buf.getvalue())
        huge = Path(tmp) / "huge.png"
        huge.write_bytes(header_only_png(13000, 13000))
        rows = {
            f"JPEG {a.width}x{a.height}, full decode": run_case(jpeg, 0, a.repeat),
            f"JPEG {a.width}x{a.height}, target_size {a.target}": run_case(jpeg, a.target, a.repeat),
            "PNG header 13000x13000 (refused)": run_case(huge, a.target, a.repeat),
        }
    for name, row in rows.items():
        print(f"{name:45s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
