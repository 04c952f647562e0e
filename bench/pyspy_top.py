"""Summarise a `py-spy record --format raw` profile: the functions with the most samples, self and inclusive.

py-spy record --nonblocking -r 50 -d 12 -f raw -o prof.txt -p PID
.venv/bin/python bench/pyspy_top.py prof.txt [--top 20]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def summarise(path: str) -> tuple[int, Counter, Counter]:
    """(samples, self counts, inclusive counts) per function (line numbers dropped)."""
    own, incl, total = Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            stack, n = line.rstrip().rsplit(" ", 1)
            frames = [re.sub(r":\d+\)", ")", fr) for fr in stack.split(";")]
            total += int(n)
            own[frames[-1]] += int(n)
            for fr in set(frames):
                incl[fr] += int(n)
    return total, own, incl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args(argv)
    total, own, incl = summarise(a.profile)
    print(f"{total} samples")
    for title, counts in (("self", own), ("inclusive", incl)):
        print(f"--- {title}")
        for name, n in counts.most_common(a.top):
            print(f"{n / total * 100:5.1f} %  {name[:140]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
