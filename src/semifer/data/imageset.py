"""In-memory image sets and step-addressed batch sources.

A batch is a pure function of ``(seed, step, rank)``: which samples it holds comes
from a per-epoch permutation seeded by ``(seed, epoch)``. That is what makes resume
exact without saving sampler state, and what shards the data across DDP ranks
(each rank takes its slice of the same global batch, so every sample is seen once
per epoch and no index repeats inside a global batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class ImageSet:
    """Decoded uint8 images (N, C, H, W) with labels in ABAW order (-1 = unlabeled)."""

    images: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor | None = None  # hidden labels of synthetic unlabeled data (diagnostics only)
    name: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # unusable inputs by reason (see data/decode.py)
    frames: list[tuple[str, int]] | None = None  # (video, 1-based frame) per sample, for video sources

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]

    def class_counts(self, num_classes: int) -> torch.Tensor:
        y = self.labels[self.labels >= 0]
        return torch.bincount(y, minlength=num_classes)[:num_classes]


def conform(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to ``size`` x ``size`` and convert to 1 or 3 channels."""
    if images.shape[1] != channels:
        if channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    if images.shape[-1] != size or images.shape[-2] != size:
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        images = out.round().clamp(0, 255).to(torch.uint8)
    return images


def _mix(*xs: int) -> int:
    """Deterministic 63-bit seed from integers (no Python hash randomisation)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, step: int, rank: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one (seed, step, rank, stream): augmentation randomness that survives resume."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, step, rank, stream))
    return g


class StepSampler:
    """Indices of rank ``rank``'s share of global batch ``step``.

    Each epoch is one permutation of ``n`` samples cut into ``n // global_batch``
    global batches (the remainder waits for a later epoch's permutation). Sets
    smaller than one global batch are tiled first.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, stream: int = 0) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty set")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.stream = stream
        self.global_batch = batch_size * world_size
        self.tiles = -(-self.global_batch // n)  # ceil: small sets are repeated to fill a batch
        self.steps_per_epoch = (n * self.tiles) // self.global_batch
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, self.stream, 0x5A))
            self._perm = torch.randperm(self.n * self.tiles, generator=g) % self.n
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]


class InMemorySource:
    """Step-addressed batches from an :class:`ImageSet` (indexed: batches carry dataset indices).

    ``pin_memory`` (needs CUDA): batches are gathered straight into page-locked memory, so a
    ``.to("cuda", non_blocking=True)`` copy neither waits for the device nor copies twice.
    """

    has_index = True

    def __init__(self, data: ImageSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 stream: int = 0, pin_memory: bool = False) -> None:
        self.data = data
        self.sampler = StepSampler(len(data), batch_size, seed, rank, world_size, stream)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.data)

    def _take(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not self.pin_memory:
            return t[idx]
        # The caching host allocator reuses a freed pinned block only after its copy has finished.
        out = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=out)

    def batch(self, step: int) -> dict[str, torch.Tensor | None]:
        idx = self.sampler.indices(step)
        tl = self.data.true_labels
        pinned = idx.pin_memory() if self.pin_memory else idx
        return {"x": self._take(self.data.images, idx), "y": self._take(self.data.labels, idx), "idx": pinned,
                "y_true": self._take(tl, idx) if tl is not None else None}
