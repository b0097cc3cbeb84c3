"""The convolutional blocks the VAE and the VQ tokenizer are both built from.

Both autoencoders descend from the taming-transformers / LDM design, and their checkpoints use
the same names inside a block (`norm1`, `conv1`, …, `q`/`k`/`v`/`proj_out`), so one definition
serves both and they share numerics: GroupNorm statistics in fp32 and attention through the
one attention backend (`attention.py`). Only how the blocks are arranged into levels differs
(that stays in vae.py and vq.py, which follow their checkpoints' key layouts).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are taken in fp32 (bf16 variance over 512×128×128 values drifts)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int) -> GroupNorm32:
    """The norm of every block: `groups` groups, eps 1e-6 (as the checkpoints were trained)."""
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm → SiLU → 3×3 conv, twice, plus the input (through a 1×1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1×1 convs as projections, scale c^-½)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        out = attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one pixel right and bottom (the checkpoints' alignment)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
