"""Tiny random models written in the real layouts, under the real file and folder names.

Used by the layout, parity and real-workflow tests: nothing is downloaded. Each writer puts
files where a user's download would put them (`models/text_encoders/clip_l.safetensors`,
`models/diffusion_models/FLUX.1-schnell/transformer/diffusion_pytorch_model-00001-of-00002.safetensors`,
...). Tokenizers are trained in a second with `tokenizers` (a byte-level BPE with CLIP's word
ends, a Unigram model with T5's special tokens). Sizes are chosen so that every setting the
real files leave out is inferable: the CLIP tower is 512 wide (a known CLIP width, 8 heads).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    SentencePieceUnigramTokenizer,
    Tokenizer,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from tessera.engines.clip import CLIPTextConfig, CLIPTextModel
from tessera.engines.flux import FluxConfig
from tessera.engines.t5 import T5Config, T5Encoder
from tessera.engines.vae import VAEConfig
from tessera.engines.vq import VQConfig

WORDS = (
    "a photo of the cat dog red green blue apple on table under tree sky sunset city night street "
    "portrait painting watercolor oil astronaut riding horse mountain lake river forest snow "
    "café naïve Zürich東京 山 水 🐱 🚀 ünïcödé façade déjà vu São Paulo Ελληνικά русский عربى"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of a byte-level BPE with '</w>' word ends and CLIP's two special tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(
        models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>")
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.model.save(str(folder))
    return folder


def write_t5_tokenizer(folder: Path) -> Path:
    """tokenizer.json of a Unigram model with T5's <pad>=0, </s>=1, <unk>=2, word split and '$A </s>'."""
    folder.mkdir(parents=True, exist_ok=True)
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        corpus(), vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok = Tokenizer.from_str(sp.to_str())
    # T5's tokenizer.json pipeline: split on whitespace, then '▁' before every word; no NFKC
    # (the real files normalise with sentencepiece's precompiled charsmap, which a test cannot train)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
    return folder


# ---------------------------------------------------------------- tiny configs

CLIP = CLIPTextConfig(
    vocab_size=600,
    hidden_size=512,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=8,
    bos_token_id=0,
    eos_token_id=1,
)
T5 = T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
FLAN = T5Config(vocab_size=320, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=6)
DIT = FluxConfig(
    in_channels=4,
    out_channels=4,
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single=1,
    context_dim=T5.d_model,
    vec_dim=CLIP.hidden_size,
    axes_dim=(4, 6, 6),
    guidance_embed=False,
)
VAE = VAEConfig(
    latent_channels=4,
    block_out_channels=(8, 8),
    layers_per_block=1,
    norm_groups=4,
    scaling_factor=0.5,
    shift_factor=0.1,
)
VQ = VQConfig(
    channels=8,
    ch_mult=[1, 2],
    decoder_ch_mult=[1, 2],
    num_res_blocks=1,
    z_channels=8,
    codebook_size=64,
    codebook_dim=4,
    norm_groups=4,
)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) * 0.2).to(v.dtype) if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }


def clip_state(seed: int = 0, config: CLIPTextConfig = CLIP) -> dict[str, torch.Tensor]:
    sd = random_state(CLIPTextModel(config), seed)
    sd["text_model.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    sd["text_projection.weight"] = torch.randn(16, config.hidden_size)  # in ComfyUI's clip_l; unused by Flux
    return sd


def t5_state(seed: int = 1, config: T5Config = T5) -> dict[str, torch.Tensor]:
    sd = random_state(T5Encoder(config), seed)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    return sd
