"""PatchCore (Roth et al., CVPR 2022, "Towards Total Recall in Industrial Anomaly Detection"), pure torch.

A frozen ImageNet CNN gives locally aware patch features: two middle taps (ResNet layer2 + layer3,
MobileNetV2 features.6 + features.13; strides 8 and 16), each averaged over its 3x3 neighbourhood, the deeper
one upsampled (bilinear) to the first's grid, concatenated and average-pooled over channels to a fixed
dimension (`n_features`; the paper's 1024, or all channels when fewer). A greedy coreset of the normal
images' patch embeddings is the memory bank (models/coreset.py). A patch's score is the distance to its
nearest bank entry; the map is upsampled to the image and blurred (sigma 4). The image score is the paper's
reweighted maximum (Eq. 7): s = (1 - softmax of the distances from the most anomalous test patch to its
nearest bank entry m* and to m*'s `num_neighbors` - 1 nearest bank neighbours, at m*) x s*. Every consumer
here takes the image score as the maximum of the map, so the map is scaled by that weight: its maximum is the
paper's score (with s* taken after the blur), and the order of pixels within an image is unchanged.

The nearest-neighbour search is squared distances by matrix products (||x||^2 - 2 x.m + ||m||^2) and a min
over bank blocks, TopK for the support set: traced as they are, so the exported IR holds the bank and
searches it in the graph.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from distributed_anomaly.data.sizes import ImageSize
from distributed_anomaly.models.backbones import FrozenBackboneModel
from distributed_anomaly.models.coreset import projection
from distributed_anomaly.models.maps import upsample_blur
from distributed_anomaly.models.specs import (
    PATCHCORE_CORESET_RATIO,
    PATCHCORE_NUM_NEIGHBORS,
    check_n_features,
    default_layers,
    get_spec,
    patchcore_dim,
)

BANK_BLOCK = 4096  # bank rows per distance block: (rows x BANK_BLOCK) float32 at a time
ROW_BLOCK = 4096  # patch rows per block in eager mode (a traced graph takes the whole batch at once)


def channel_pool(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out) matrix of adaptive average pooling over channels: column j averages channels
    [floor(j n_in / n_out), ceil((j + 1) n_in / n_out)), as F.adaptive_avg_pool1d does."""
    pool = torch.zeros(n_in, n_out)
    for j in range(n_out):
        a, b = (j * n_in) // n_out, -((-(j + 1) * n_in) // n_out)
        pool[a:b, j] = 1.0 / (b - a)
    return pool


def nearest(x: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance (N,) of each row of x (N, D) to its nearest bank row, and that row's index (N,)."""
    x_sq = (x * x).sum(1, keepdim=True)
    best = index = None
    for s in range(0, int(bank.shape[0]), BANK_BLOCK):
        block = bank[s : s + BANK_BLOCK]
        d = torch.addmm(x_sq + (block * block).sum(1), x, block.t(), alpha=-2.0)
        val, idx = d.min(1)
        if best is None:
            best, index = val, idx
        else:
            better = val < best
            best, index = torch.where(better, val, best), torch.where(better, idx + s, index)
    return best.clamp_min(0), index


class PatchCore(FrozenBackboneModel):
    """Feature extractor + channel pooling + memory bank (set by a fit: `set_bank`)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        n_features: int | None = None,
        image_size: ImageSize = 256,
        *,
        coreset_ratio: float | None = None,
        num_neighbors: int | None = None,
        pretrained: bool = True,
        weights_file: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        layers = tuple(layers or default_layers(get_spec(backbone), "patchcore"))
        super().__init__(backbone, layers, image_size, pretrained=pretrained, weights_file=weights_file, seed=seed)
        n_total = sum(self.extractor.channels)
        n_features = n_features if n_features is not None else patchcore_dim(n_total)
        self.n_features = check_n_features(n_features, n_total, self.extractor.layers, backbone)
        self.coreset_ratio = float(coreset_ratio if coreset_ratio is not None else PATCHCORE_CORESET_RATIO)
        self.num_neighbors = int(num_neighbors if num_neighbors is not None else PATCHCORE_NUM_NEIGHBORS)
        self.seed = seed
        pool = channel_pool(n_total, self.n_features) if self.n_features < n_total else None
        self.register_buffer("pool", pool, persistent=False)  # derived from the shapes: never stored
        self.register_buffer("memory_bank", torch.zeros(0, self.n_features))

    def projection(self) -> torch.Tensor | None:
        """The coreset's seeded random projection for this embedding dimension."""
        return projection(self.n_features, self.seed)

    def embed_taps(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tap feature maps (shallow first) -> locally aware patch embeddings (B, P, n_features)."""
        maps = [F.avg_pool2d(t, 3, stride=1, padding=1) for t in taps]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        emb = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
        return emb @ self.pool if self.pool is not None else emb

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P, n_features)."""
        feats = self.extractor(images)
        return self.embed_taps([feats[name] for name in self.extractor.layers])

    def set_bank(self, bank: torch.Tensor) -> None:
        if bank.ndim != 2 or bank.shape[1] != self.n_features or bank.shape[0] == 0:
            raise ValueError(f"a memory bank must be (M > 0, {self.n_features}), got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().to(torch.float32).clone()  # a plain tensor even from inference mode

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The bank's size is the fit's (ratio x patches): take the stored one's shape before loading it.
        stored = state_dict.get(prefix + "memory_bank")
        if stored is not None and stored.ndim == 2:
            self.memory_bank = torch.empty(stored.shape, dtype=torch.float32)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def patch_scores(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to the nearest bank entry (B, P) and its index (B, P)."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore has no memory bank: fit it first")
        b, p, d = emb.shape
        rows = emb.reshape(-1, d)
        if torch.jit.is_tracing() or rows.shape[0] <= ROW_BLOCK:
            dist2, index = nearest(rows, self.memory_bank)
        else:  # eager: bounded temporaries whatever the batch
            parts = [nearest(rows[i : i + ROW_BLOCK], self.memory_bank) for i in range(0, rows.shape[0], ROW_BLOCK)]
            dist2, index = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        return dist2.sqrt().reshape(b, p), index.reshape(b, p)

    def image_weights(self, emb: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The paper's reweighting factor (B,) of each image's most anomalous patch (Eq. 7)."""
        k = min(self.num_neighbors, int(self.memory_bank.shape[0]))
        if k < 2:  # 1 - softmax over one distance is 0: the paper's score is then s* itself
            return torch.ones(scores.shape[0], dtype=scores.dtype)
        top = scores.argmax(1, keepdim=True)  # (B, 1)
        test = emb.gather(1, top[:, :, None].expand(-1, 1, emb.shape[2]))[:, 0]  # m_test*: (B, D)
        star = self.memory_bank.index_select(0, index.gather(1, top)[:, 0])  # m*: (B, D)
        bank_sq = (self.memory_bank * self.memory_bank).sum(1)
        to_star = torch.addmm(bank_sq, star, self.memory_bank.t(), alpha=-2.0)  # ||m* - m||^2 - ||m*||^2
        support = to_star.topk(k, dim=1, largest=False).indices  # N_b(m*), m* first: (B, k)
        neighbours = self.memory_bank.index_select(0, support.reshape(-1)).reshape(-1, k, emb.shape[2])
        dist = (neighbours - test[:, None, :]).pow(2).sum(-1).clamp_min(0).sqrt()  # (B, k)
        return 1.0 - torch.softmax(dist, dim=1)[:, 0]

    def score_embeddings(self, emb: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Patch embeddings (B, P, D) -> anomaly maps (B, 1, H, W) at `size`, scaled by the image weights."""
        scores, index = self.patch_scores(emb)
        weights = self.image_weights(emb, scores, index)
        return upsample_blur(scores.reshape(-1, 1, *self.grid), size) * weights[:, None, None, None]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> anomaly maps (B, 1, H, W)."""
        return self.score_embeddings(self.embed(images), images.shape[-2:])

    def input_size(self) -> tuple[int, int]:
        return self.grid[0] * self.extractor.strides[0], self.grid[1] * self.extractor.strides[0]
