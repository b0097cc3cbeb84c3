"""Tiny random-weight model files for the browser tests, written with the engines' own code.

Sizes are the smallest that load and run in well under a second on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from tessera.engines.flux import Flux, FluxConfig, save_dit
from tessera.engines.gpt import GPT as GPTModel
from tessera.engines.gpt import GPTConfig
from tessera.engines.text_encoder import save_text_encoder, tiny_text_encoder
from tessera.engines.vae import AutoencoderKL, VAEConfig, save_vae
from tessera.engines.vq import VQConfig, VQModel

DIT = "tiny-dit.safetensors"
VAE = "tiny-vae.safetensors"
TEXT_ENCODER = "tiny-text-encoder.safetensors"
GPT = "tiny-gpt.safetensors"
VQ = "tiny-vq.safetensors"


def _save(model: torch.nn.Module, config, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"tessera.config": json.dumps(asdict(config))})


def write_ar_models(models: Path) -> list[str]:
    (models / "vq_models").mkdir(parents=True, exist_ok=True)
    (models / "ar_models").mkdir(parents=True, exist_ok=True)
    vq_cfg = VQConfig(
        channels=32,
        ch_mult=[1, 2],
        decoder_ch_mult=[1, 2],
        num_res_blocks=1,
        z_channels=16,
        codebook_size=64,
        codebook_dim=8,
        norm_groups=8,
    )
    _save(VQModel(vq_cfg), vq_cfg, models / "vq_models" / VQ)
    gpt_cfg = GPTConfig(
        dim=64, n_layer=2, n_head=2, n_kv_head=2, ffn_hidden=128, vocab_size=64, num_classes=10, grid_size=8
    )
    _save(GPTModel(gpt_cfg), gpt_cfg, models / "ar_models" / GPT)
    return [GPT, VQ]


def write_diffusion_models(models: Path) -> list[str]:
    for folder in ("vae", "text_encoders", "diffusion_models"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL(
        VAEConfig(latent_channels=4, block_out_channels=(16, 16), layers_per_block=1, norm_groups=8)
    )
    save_vae(vae, models / "vae" / VAE, json.dumps({"data": "tiny 32x32 test images"}))  # native size: 32
    encoder = tiny_text_encoder()
    save_text_encoder(encoder, models / "text_encoders" / TEXT_ENCODER)
    dit = Flux(
        FluxConfig(
            in_channels=4,
            out_channels=4,
            hidden_size=32,
            num_heads=2,
            depth=1,
            depth_single=1,
            context_dim=encoder.config.context_dim,
            vec_dim=encoder.config.pooled_dim,
            axes_dim=(4, 6, 6),
            guidance_embed=False,
        )
    )
    save_dit(dit, models / "diffusion_models" / DIT)
    return [VAE, TEXT_ENCODER, DIT]


def write_tiny_models(models: Path) -> list[str]:
    """Writes every tiny model; returns the file names written."""
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return write_diffusion_models(models) + write_ar_models(models)
