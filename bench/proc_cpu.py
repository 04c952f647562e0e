"""CPU share of each process on this machine over a window, busiest first (from /proc; Linux only).

    .venv/bin/python bench/proc_cpu.py [--seconds 15] [--top 14]

Run it while a benchmark loads the system (e.g. bench/serve_load.py): Ray names its worker processes after
their actors (ray::ServeReplica:APP:DEPLOYMENT, ray::ProxyActor), so the lines say where the CPU went.
"""

from __future__ import annotations

import argparse
import os
import time


def snapshot() -> dict[str, tuple[int, str]]:
    """pid -> (user + system clock ticks so far, command line)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ").strip()
        except OSError:  # the process ended meanwhile
            continue
        out[pid] = (int(fields[11]) + int(fields[12]), cmd)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args(argv)
    before, t = snapshot(), time.monotonic()
    time.sleep(a.seconds)
    after, dt = snapshot(), time.monotonic() - t
    hz = os.sysconf("SC_CLK_TCK")
    rows = sorted(((after[p][0] - before[p][0]) / hz / dt * 100, p, after[p][1]) for p in after if p in before)
    for share, pid, cmd in rows[::-1][: a.top]:
        print(f"{share:6.1f} %  {pid:>7}  {cmd[:100]}")
    print(f"total {sum(r[0] for r in rows):.1f} % of one core over {dt:.1f} s ({os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
