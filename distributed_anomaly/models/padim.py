"""PADIM (Defard et al., 2020, "PaDiM: a Patch Distribution Modeling Framework"), pure torch.

A frozen pretrained CNN embeds each patch position by concatenating its feature taps (deeper taps upsampled
to the first tap's grid), keeps a seeded random subset of channels, and models each position with a
Gaussian. The anomaly map is the Mahalanobis distance of each patch to its position's Gaussian (Eq. 2),
upsampled to the input and smoothed with a Gaussian blur (sigma = 4); the image score is the map's maximum.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import torch

from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.models.backbones import FrozenBackboneModel, get_spec
from distributed_anomaly.models.maps import upsample_blur
from distributed_anomaly.models.specs import check_n_features
from distributed_anomaly.stats import COVARIANCE_EPS, GaussianStats


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """sqrt((x - mu)^T Sigma^-1 (x - mu)) per patch: embedding (B, C, P), mean (P, C), inv_cov (P, C, C) -> (B, P)."""
    return mahalanobis_deviations(embedding.transpose(1, 2) - mean, inv_cov)


def mahalanobis_deviations(dev: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """The same from deviations x - mu laid out (B, P, C), as the frozen-network runtimes emit them -> (B, P)."""
    delta = dev.permute(1, 0, 2)  # (P, B, C): per position, a (B, C) @ (C, C) product
    dist = (torch.bmm(delta, inv_cov) * delta).sum(-1)  # (P, B)
    return dist.clamp_min(0).sqrt().transpose(0, 1)


HEAD_BLOCKS = 2


def whitening_factor(inv_cov: torch.Tensor) -> torch.Tensor | None:
    """W lower triangular with W^T W = Sigma^-1 (per position), for a model loaded with inv_cov only: the
    Cholesky factor of Sigma^-1 with rows and columns reversed (that of J Sigma^-1 J, J the reversal), which is
    the L^-1 a fit computes (the factor is unique; computed this other way it differs by float rounding, ~1e-7
    relative in the maps). None if Sigma^-1 is not positive definite (unfitted)."""
    try:
        flipped = torch.linalg.cholesky(inv_cov.double().flip(-1, -2))
    except torch.linalg.LinAlgError:
        return None
    return flipped.flip(-1, -2).transpose(-1, -2).to(inv_cov.dtype)


def whitening_blocks(white: torch.Tensor, blocks: int = HEAD_BLOCKS) -> list[tuple[int, torch.Tensor]]:
    """The lower-triangular W (W^T W = Sigma^-1) cut into row blocks that skip its zero corner.

    The squared distance is ||W d||^2 = sum over row blocks [a, b) of ||W[a:b, :b] d[:b]||^2: with 2 blocks,
    3/4 of Sigma^-1's bytes and products, and squares in place of the (x - mu) * (Sigma^-1 (x - mu))
    products. Measured on this CPU with the equivalent upper-triangular blocks (batch 8, one thread, a loaded
    machine): torch 4.1 -> 2.1 CPU ms per image, OpenVINO 2.2 -> 2.1; equal to the plain formula within 1e-5
    relative (tests/test_models.py).
    Returns [(b, W[:, a:b, :b] transposed (P, b, b - a))].
    """
    c = int(white.shape[-1])
    bounds = sorted({round(i * c / blocks) for i in range(blocks + 1)})
    return [(b, white[:, a:b, :b].transpose(1, 2).contiguous()) for a, b in itertools.pairwise(bounds)]


def mahalanobis_blocks(dev: torch.Tensor, blocks: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """mahalanobis_deviations through `whitening_blocks`: (B, P, C) -> (B, P)."""
    delta = dev.permute(1, 0, 2)  # (P, B, C)
    dist = None
    for end, factor in blocks:
        part = torch.bmm(delta[:, :, :end], factor)  # (P, B, rows)
        part = (part * part).sum(-1)
        dist = part if dist is None else dist + part
    return dist.sqrt().transpose(0, 1)


def _positions_on_grid(tap: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) tap -> (H, W, B, C) on the (H, W) grid, nearest-neighbour upsampled as
    interpolate(mode="nearest") does, by repeating rows and columns: the grid is a whole multiple of every
    tap's (image sides are checked to be multiples of the deepest tap's stride)."""
    # Spatial sizes and channels are fixed by the model; the batch stays -1, so the export keeps it dynamic.
    c, h, w = (int(n) for n in tap.shape[1:])
    gh, gw = (int(n) for n in grid)
    if (h, w) == (gh, gw):
        return tap.permute(2, 3, 0, 1)
    rows = tap.permute(2, 3, 0, 1)[:, None, :, None]  # (h, 1, w, 1, B, C)
    return rows.expand(h, gh // h, w, gw // w, -1, c).reshape(gh, gw, -1, c)


class Padim(FrozenBackboneModel):
    """Feature extractor + random channel index + per-position Gaussian (mean, inverse covariance)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        n_features: int | None = None,
        image_size: ImageSize = 256,
        *,
        pretrained: bool = True,
        weights_file: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, layers, image_size, pretrained=pretrained, weights_file=weights_file, seed=seed)
        n_total = sum(self.extractor.channels)
        n_features = n_features if n_features is not None else min(get_spec(backbone).default_n_features, n_total)
        self.n_features = check_n_features(n_features, n_total, self.extractor.layers, backbone)
        generator = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n_total, generator=generator)[: self.n_features].sort().values
        # Stored as buffers so a saved model repeats its channel choice exactly.
        self.register_buffer("idx", idx)
        self.register_buffer("mean", torch.zeros(self.n_positions, self.n_features))
        self.register_buffer("inv_cov", torch.zeros(self.n_positions, self.n_features, self.n_features))
        self.register_load_state_dict_post_hook(Padim._refresh_head)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, n_features, P) embeddings (a view of `embed_positions`)."""
        return self.embed_positions(images).permute(1, 2, 0)

    def embed_positions(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (P, B, n_features): position-major, as the head's per-position
        products take them.

        Each tap's chosen channels (idx is sorted: the order of a gather from the full concatenation) are put
        position-major at the tap's own resolution, then deeper taps are repeated onto the first tap's grid and
        all concatenated: the transposes move 1/4 of the bytes that transposing the full embedding would, and
        no layout change precedes a gather over the whole concatenation. With `upsample_blur`, the exported IR
        (MobileNetV2, 256 px, batch 8) went from 176 to 231 images/s (bench/ir_ab.py, one run)."""
        feats = self.extractor(images)
        taps = [(feats[layer], sel) for layer, sel in self.tap_channels() if sel.numel()]  # a tap may have none
        emb = torch.cat([_positions_on_grid(t.index_select(1, sel), self.grid) for t, sel in taps], dim=-1)
        return emb.reshape(self.n_positions, -1, self.n_features)

    def tap_channels(self) -> list[tuple[str, torch.Tensor]]:
        """(tap, its local channel indices) per tap: the sorted idx split by tap, the order of a gather from the
        full concatenation. From the current idx; constants when the export traces `embed`."""
        key = (self.idx._version, self.idx.data_ptr())
        if getattr(self, "_taps_key", None) != key:
            chosen, taps, start = self.idx.tolist(), [], 0
            for layer, n in zip(self.extractor.layers, self.extractor.channels):
                local = [i - start for i in chosen if start <= i < start + n]
                taps.append((layer, torch.tensor(local, dtype=torch.long)))
                start += n
            self._taps, self._taps_key = taps, key
        return self._taps

    def set_gaussian(self, stats: GaussianStats, eps: float = COVARIANCE_EPS) -> None:
        mean, inv_cov, white = stats.finalize_whitened(eps)
        if mean.shape != self.mean.shape:
            raise ValueError(f"statistics of shape {tuple(mean.shape)} do not fit this model {tuple(self.mean.shape)}")
        self.mean.copy_(mean)
        self.inv_cov.copy_(inv_cov)
        self._refresh_head(white=white)

    def head_blocks(self) -> list[tuple[int, torch.Tensor]]:
        """whitening_blocks of the current inv_cov. Computed when inv_cov is set (set_gaussian, load_state_dict),
        so a traced forward (the export) sees them as constants and never traces the Cholesky factorisation;
        recomputed here only if inv_cov was changed some other way."""
        if getattr(self, "_head_key", None) != self._inv_cov_key():
            self._refresh_head()
        return self._head

    def _inv_cov_key(self) -> tuple[int, int]:
        return self.inv_cov._version, self.inv_cov.data_ptr()

    def _refresh_head(self, *_args, white: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            white = white if white is not None else whitening_factor(self.inv_cov)
            self._head = whitening_blocks(white) if white is not None else []
            self._head_key = self._inv_cov_key()

    def score_deviations(self, dev: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Deviations from the means (B, P, C) -> anomaly maps (B, 1, H, W) at `size` (H, W)."""
        blocks = self.head_blocks()
        dist = mahalanobis_blocks(dev, blocks) if blocks else mahalanobis_deviations(dev, self.inv_cov)
        return upsample_blur(dist.reshape(-1, 1, *self.grid), size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> anomaly maps (B, 1, H, W)."""
        # Deviations formed position-major and handed over as a (B, P, C) view: score_deviations' permutation
        # back to (P, B, C) cancels it, so the exported graph transposes nothing here.
        delta = self.embed_positions(images) - self.mean[:, None, :]
        return self.score_deviations(delta.transpose(0, 1), images.shape[-2:])
