"""Progress of long passes over images (fits, scoring), through tqdm; torch-free, so the Ray drivers and actors
that report it need no torch."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Progress of a pass over images on stderr (images done, images/s), through tqdm."""

    def __init__(self, total: int, what: str, enabled: bool = True, min_interval: float = 1.0) -> None:
        self._bar = tqdm(
            total=total,
            desc=what,
            disable=not enabled,
            mininterval=min_interval,
            file=sys.stderr,
            unit=" images",
            bar_format="{desc}: {n}/{total} images, {rate_noinv_fmt}{postfix}",
            dynamic_ncols=True,
            leave=True,
        )

    @property
    def done(self) -> int:
        return int(self._bar.n)

    @property
    def rate(self) -> float:
        elapsed = self._bar.format_dict["elapsed"]
        return self.done / max(elapsed, 1e-9)

    def update(self, n: int, extra: str = "") -> None:
        if extra:
            self._bar.set_postfix_str(extra, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
