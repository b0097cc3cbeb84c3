"""The TOKENS socket value: a grid of VQ codebook ids, optionally with some positions fixed.

A raster-order AR model only ever looks at the past, so "fixed" positions can sit
anywhere: decoding forces their id instead of sampling one. That single mask covers
continuation (top rows fixed), outpainting below an image and in-filling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGrid:
    ids: torch.Tensor  # [B, H, W] long codebook ids
    fixed: torch.Tensor | None = None  # [B, H, W] bool, True where decoding must keep the id

    def __post_init__(self) -> None:
        if self.ids.dim() != 3:
            raise ValueError(f"TokenGrid ids must be [B, H, W], got shape {tuple(self.ids.shape)}")
        if self.ids.dtype != torch.long:
            object.__setattr__(self, "ids", self.ids.long())
        if self.fixed is not None:
            if tuple(self.fixed.shape) != tuple(self.ids.shape):
                raise ValueError(
                    f"TokenGrid fixed mask shape {tuple(self.fixed.shape)} differs from ids {tuple(self.ids.shape)}"
                )
            if self.fixed.dtype != torch.bool:
                object.__setattr__(self, "fixed", self.fixed.bool())

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def height(self) -> int:
        return self.ids.shape[1]

    @property
    def width(self) -> int:
        return self.ids.shape[2]

    def fixed_mask(self) -> torch.Tensor:
        """The fixed mask, all False when none was given (nothing is forced)."""
        if self.fixed is None:
            return torch.zeros_like(self.ids, dtype=torch.bool)
        return self.fixed

    def to(self, device: torch.device | str) -> TokenGrid:
        return TokenGrid(self.ids.to(device), None if self.fixed is None else self.fixed.to(device))

    def with_fixed(self, fixed: torch.Tensor | None) -> TokenGrid:
        """The same ids under a new fixed mask ([H, W] or [B, H, W]; broadcast over the batch)."""
        if fixed is not None:
            fixed = fixed.to(self.ids.device, torch.bool).expand_as(self.ids).clone()
        return TokenGrid(self.ids, fixed)

    def fix_rows(self, rows: int) -> TokenGrid:
        """Fix the top `rows` rows and free the rest: raster-order continuation / outpainting below."""
        rows = max(0, min(rows, self.height))
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask[:rows] = True
        return self.with_fixed(mask)

    def fix_region(self, top: int, left: int, height: int, width: int, inside: bool = True) -> TokenGrid:
        """Fix a rectangle (inside=True) or everything but it (inside=False); the rest is free."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask[max(top, 0) : max(top + height, 0), max(left, 0) : max(left + width, 0)] = True
        return self.with_fixed(mask if inside else ~mask)

    def placed(self, height: int, width: int) -> TokenGrid:
        """Put this grid at the top-left of a height x width grid; new positions are free (id 0).

        Growing the height is how a graph outpaints below a tokenized image.
        """
        if height < self.height or width < self.width:
            raise ValueError(
                f"a {self.height}x{self.width} token grid does not fit in a {height}x{width} grid"
            )
        ids = torch.zeros(self.batch, height, width, dtype=torch.long, device=self.ids.device)
        fixed = torch.zeros(self.batch, height, width, dtype=torch.bool, device=self.ids.device)
        ids[:, : self.height, : self.width] = self.ids
        fixed[:, : self.height, : self.width] = self.fixed_mask()
        return TokenGrid(ids, fixed)
