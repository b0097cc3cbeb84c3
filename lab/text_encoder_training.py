"""Pre-training the built-in text encoder, text only: masked-character reconstruction on the
token features (they must keep spelling and context) plus predicting the scene's attributes
from the pooled vector (it must carry the meaning); `lab.synthetic.caption_batches` supplies
both. The encoder is then frozen while the DiT and the GPT train on top of it. The loop is
`lab.training.fit`'s, as for every kind (`lab.training.pretrain_text_encoder`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tessera.engines.text_encoder import BYTE_OFFSET, MASK, VOCAB_SIZE, TextEncoder, TextEncoderConfig


class PretrainingHeads(nn.Module):
    """Throw-away heads: characters from token features, attribute classes from the pooled vector."""

    def __init__(self, config: TextEncoderConfig, attribute_classes: Mapping[str, int]):
        super().__init__()
        self.chars = nn.Linear(config.context_dim, VOCAB_SIZE)
        self.attributes = nn.ModuleDict(
            {k: nn.Linear(config.pooled_dim, n) for k, n in attribute_classes.items()}
        )


def _mask_characters(
    ids: torch.Tensor, prob: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random `prob` of the characters (never BOS or padding) by MASK; targets -100 elsewhere."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & (ids >= BYTE_OFFSET)
    return ids.masked_fill(chosen, MASK), ids.masked_fill(~chosen, -100)


def pretraining_loss(
    model: TextEncoder,
    heads: PretrainingHeads,
    captions: Sequence[str],
    labels: Mapping[str, torch.Tensor],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked-character loss on a masked copy plus attribute losses on the clean captions."""
    generator = generator or torch.Generator().manual_seed(0)
    ids, mask = model.tokenize(captions)
    masked, char_targets = _mask_characters(ids, mask_prob, generator)
    dev = model.device
    both = model(torch.cat([ids, masked]).to(dev), torch.cat([mask, mask]).to(dev))
    b = len(captions)
    char_logits = heads.chars(both.tokens[b:])
    char_targets = char_targets.to(dev)
    chars = F.cross_entropy(char_logits.flatten(0, 1), char_targets.flatten(), ignore_index=-100)
    loss, stats = chars, {"chars": chars.item()}
    for name, head in heads.attributes.items():
        target = labels[name].to(dev)
        if (target >= 0).any():
            part = F.cross_entropy(head(both.pooled[:b]), target, ignore_index=-100)
            loss = loss + part
            stats[name] = part.item()
    stats["loss"] = loss.item()
    return loss, stats


@torch.no_grad()
def attribute_accuracy(
    model: TextEncoder,
    heads: PretrainingHeads,
    batches: Iterator[tuple[Sequence[str], Mapping[str, torch.Tensor]]],
    steps: int = 1,
) -> dict[str, float]:
    """How often the pooled vector's heads name each attribute right (over captions that have it)."""
    hits: dict[str, list[int]] = {}
    for _ in range(steps):
        captions, labels = next(batches)
        pooled = model.encode(captions).pooled
        for name, head in heads.attributes.items():
            target = labels[name].to(pooled.device)
            keep = target >= 0
            h = hits.setdefault(name, [0, 0])
            h[0] += int((head(pooled).argmax(-1)[keep] == target[keep]).sum())
            h[1] += int(keep.sum())
    return {k: c / n for k, (c, n) in hits.items() if n}
