"""STFPM (Wang et al., 2021, "Student-Teacher Feature Pyramid Matching for Anomaly Detection"), pure torch.

A frozen pretrained teacher and a randomly initialised student of the same architecture see the same normal
images; the student learns to reproduce the teacher's channel-normalised features at several scales. Where
it fails to (anomalies it never saw), the per-layer squared differences are large; their product over layers,
upsampled to the input, is the anomaly map, and its maximum the image score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distributed_anomaly.data.sizes import ImageSize, canonical
from distributed_anomaly.models.backbones import FeatureExtractor


def layer_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. 2: 0.5 / (h w) * sum over positions of ||t_hat - s_hat||^2, summed over the batch."""
    h, w = teacher.shape[-2:]
    diff = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
    return 0.5 / (h * w) * diff.pow(2).sum()


def stfpm_loss(teacher_feats: dict[str, torch.Tensor], student_feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 3: the layer losses summed over the feature pyramid."""
    return sum(layer_loss(teacher_feats[k], student_feats[k]) for k in teacher_feats)


def anomaly_map(
    teacher_feats: dict[str, torch.Tensor], student_feats: dict[str, torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Product over layers of 0.5 * ||t_hat - s_hat||^2, each upsampled bilinearly to `size` -> (B, 1, H, W)."""
    out: torch.Tensor | None = None
    for k, t in teacher_feats.items():
        diff = F.normalize(t, dim=1) - F.normalize(student_feats[k], dim=1)
        layer_map = 0.5 * diff.pow(2).sum(dim=1, keepdim=True)
        layer_map = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=False)
        out = layer_map if out is None else out * layer_map
    assert out is not None
    return out


class Stfpm(nn.Module):
    """Teacher (frozen, pretrained) and student (trainable, same architecture, random init)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] | None = None,
        image_size: ImageSize = 256,
        *,
        pretrained: bool = True,
        weights_file: str | os.PathLike | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.teacher = FeatureExtractor(backbone, layers, pretrained=pretrained, weights_file=weights_file, seed=seed)
        self.teacher.eval().requires_grad_(False)
        # A different seed: with random (non-pretrained) teacher weights the student must not start as a copy.
        self.student = FeatureExtractor(backbone, self.teacher.layers, pretrained=False, seed=seed + 1)
        self.image_size = canonical(image_size)

    def train(self, mode: bool = True) -> Stfpm:
        """Only the student ever trains; the teacher stays in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def features(
        self, images: torch.Tensor, teacher_feats: dict[str, torch.Tensor] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(teacher, student) features; `teacher_feats` when the teacher ran elsewhere (frozen.OpenVinoTeacher)."""
        if teacher_feats is None:
            with torch.no_grad():
                teacher_feats = self.teacher(images)
        return teacher_feats, self.student(images)

    def loss(self, images: torch.Tensor, teacher_feats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return stfpm_loss(*self.features(images, teacher_feats))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> anomaly maps (B, 1, H, W)."""
        t, s = self.features(images)
        return anomaly_map(t, s, tuple(images.shape[-2:]))
