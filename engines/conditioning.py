"""The conditioning value shared by both paradigms.

A text encoder turns prompts into a token sequence plus one pooled vector. The DiT
reads `tokens` as its text stream and `pooled` as its vector input; the GPT projects
`tokens` into its prefix (LlamaGen's caption path). One type means one `TextEncode`
node feeds either engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    tokens: torch.Tensor  # [B, L, D] per-token text features
    pooled: torch.Tensor  # [B, P] one vector per prompt
    mask: torch.Tensor  # [B, L] bool, True where a token is real (not padding)
    # Flux dev's distilled-guidance strength when the encode node sets it (ComfyUI keeps it on the
    # conditioning too); None leaves it to the sampler's `guidance` input.
    guidance: float | None = None
    source: str = ""  # which encoder(s) made it ("CLIP", "T5", "CLIP + T5", ...), for error messages

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        return Conditioning(
            self.tokens.to(device, dtype),
            self.pooled.to(device, dtype),
            self.mask.to(device),
            self.guidance,
            self.source,
        )
