"""Cheap latent → RGB previews for step progress, without running the VAE decoder.

Each latent cell is mapped to a colour by an affine projection [C + 1, 3] fitted once per VAE by
least squares: encode a few smooth random colour fields, pair every latent cell with the mean
colour of the pixels it covers, solve. When no VAE was ever seen (a latent built from a channel
count alone), the three principal components of the latent itself stand in.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from tessera.engines.vae import AutoencoderKL

_fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def fit_rgb_projection(vae: AutoencoderKL, images: int = 6, size: int = 64, seed: int = 0) -> Tensor:
    """Least-squares affine map from the VAE's normalised latents to RGB in 0..1, shape [C + 1, 3]."""
    f = vae.config.downscale
    size = max(size, 4 * f)
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(images, 3, 4, 4, generator=g)
    pixels = F.interpolate(colours, size=(size, size), mode="bilinear", align_corners=True)
    latents = vae.encode(pixels * 2 - 1).float().cpu()
    target = F.avg_pool2d(pixels, f)
    a = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1).double()
    y = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    ridge = 1e-4 * torch.eye(a.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a.T @ a + ridge, a.T @ y).float()


def rgb_projection_for(vae: AutoencoderKL) -> Tensor:
    """`fit_rgb_projection`, computed once per VAE object."""
    if vae not in _fits:
        _fits[vae] = fit_rgb_projection(vae)
    return _fits[vae]


def _pca_rgb(x: Tensor) -> Tensor:
    """[C, h, w] → [h, w, 3] from the latent's own top-3 principal components, stretched to 0..1."""
    c, h, w = x.shape
    flat = x.reshape(c, -1).T
    flat = flat - flat.mean(0)
    k = min(3, c)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    rgb = flat @ v[:k].T
    if k < 3:
        rgb = torch.cat([rgb, rgb[:, :1].expand(-1, 3 - k)], dim=1)
    lo, hi = rgb.quantile(0.02, dim=0), rgb.quantile(0.98, dim=0)
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).reshape(h, w, 3)


def latent_preview(samples: Tensor, projection: Tensor | None = None, min_side: int = 256) -> Image.Image:
    """A PIL preview of the first latent of [B, C, h, w] (or of [C, h, w]), upscaled to ≥ min_side."""
    x = samples[0] if samples.ndim == 4 else samples
    x = x.detach().float().cpu()
    if projection is not None and projection.shape[0] == x.shape[0] + 1:
        rgb = (torch.einsum("chw,cr->hwr", x, projection[:-1]) + projection[-1]).clamp(0, 1)
    else:
        rgb = _pca_rgb(x)
    image = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())
    scale = max(1, -(-min_side // max(image.size)))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image
