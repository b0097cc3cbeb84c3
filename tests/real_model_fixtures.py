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
from safetensors.torch import save_file
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
from tessera.engines.flux import Flux, FluxConfig
from tessera.engines.gpt import GPT, GPTConfig, gpt_config_metadata
from tessera.engines.t5 import T5Config, T5Encoder
from tessera.engines.vae import AutoencoderKL, VAEConfig
from tessera.engines.vq import VQConfig, VQModel, vq_config_metadata

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
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()  # the tied copy real files carry
    return sd


# ---------------------------------------------------------------- files, as the catalogue lays them out

DIT_SCHNELL = FluxConfig(
    in_channels=16,
    out_channels=16,
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single=1,
    context_dim=T5.d_model,
    vec_dim=CLIP.hidden_size,
    axes_dim=(2, 6, 8),
    guidance_embed=False,
)
DIT_DEV = FluxConfig(**{**DIT_SCHNELL.__dict__, "guidance_embed": True})
# 32 channels: the ldm single file cannot tell the norm groups, and 32 is what the real files use
AE = VAEConfig(latent_channels=16, block_out_channels=(32, 32), layers_per_block=1)
GPT_C2I = GPTConfig(
    dim=32,
    n_layer=1,
    n_head=2,
    n_kv_head=2,
    ffn_hidden=64,
    vocab_size=VQ.codebook_size,
    num_classes=1000,
    cls_token_num=1,
    grid_size=4,
)
GPT_T2I = GPTConfig(
    dim=32,
    n_layer=1,
    n_head=2,
    n_kv_head=2,
    ffn_hidden=64,
    vocab_size=VQ.codebook_size,
    num_classes=0,
    caption_dim=FLAN.d_model,
    cls_token_num=120,
    grid_size=4,
)


def save(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, stem: str, shards: int = 2) -> list[Path]:
    """`{stem}-0000i-of-0000n.safetensors` plus `{stem}.safetensors.index.json`, as `save_pretrained` shards."""
    keys = sorted(sd)
    names = [f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[min(shards - 1, i * shards // len(keys))] for i, k in enumerate(keys)}
    paths = []
    for name in names:
        paths.append(save({k: sd[k] for k in keys if weight_map[k] == name}, folder / name, {"format": "pt"}))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def write_tokenizers(models: Path) -> None:
    """models/tokenizers/<name>/, where `tessera models pull` puts the tokenizers of ComfyUI's single files."""
    write_clip_tokenizer(models / "tokenizers" / "clip-vit-large-patch14")
    write_t5_tokenizer(models / "tokenizers" / "t5-v1_1-xxl")


def write_flux(models: Path, dev: bool = False) -> None:
    """flux1-schnell/dev.safetensors (BFL), ae.safetensors (ldm), clip_l + t5xxl_fp16 (ComfyUI) and tokenizers."""
    write_tokenizers(models)
    save(clip_state(), models / "text_encoders" / "clip_l.safetensors")
    save({k: v.half() for k, v in t5_state().items()}, models / "text_encoders" / "t5xxl_fp16.safetensors")
    save(random_state(AutoencoderKL(AE), 2), models / "vae" / "ae.safetensors")
    name = "flux1-dev.safetensors" if dev else "flux1-schnell.safetensors"
    save(random_state(Flux(DIT_DEV if dev else DIT_SCHNELL), 3), models / "diffusion_models" / name)


def write_llamagen(models: Path, kind: str) -> None:
    """LlamaGen as `tessera models pull` leaves it: converted GPT and VQ files (their config in the
    metadata, as `tessera convert` writes it) and, for t2i, FLAN-T5-XL as a sharded HF folder."""
    vq = random_state(VQModel(VQ), 4)
    save(vq, models / "vq_models" / f"llamagen_vq_ds16_{kind}.safetensors", vq_config_metadata(VQ))
    if kind == "c2i":
        cfg, name = GPT_C2I, "llamagen_c2i_XL_384.safetensors"
    else:
        cfg, name = GPT_T2I, "llamagen_t2i_XL_stage2_512.safetensors"
        folder = models / "text_encoders" / "flan-t5-xl"
        save_sharded(t5_state(5, FLAN), folder, "model")
        config = {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "d_model": FLAN.d_model,
            "d_kv": FLAN.d_kv,
            "d_ff": FLAN.d_ff,
            "num_layers": FLAN.num_layers,
            "num_heads": FLAN.num_heads,
            "feed_forward_proj": "gated-gelu",
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "vocab_size": FLAN.vocab_size,
        }
        (folder / "config.json").write_text(json.dumps(config))
        write_t5_tokenizer(folder)
    save(random_state(GPT(cfg), 6), models / "ar_models" / name, gpt_config_metadata(cfg))


# ---------------------------------------------------------------- VAR (FoundationVision), as its .pth files hold it

VAR_PATCH_NUMS = (
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    13,
    16,
)  # the published scale list (the files store only its length)


def _conv(sd: dict, key: str, cout: int, cin: int, k: int) -> None:
    sd[f"{key}.weight"], sd[f"{key}.bias"] = (cout, cin, k, k), (cout,)


def _resnet(sd: dict, key: str, cin: int, cout: int) -> None:
    for norm, c in (("norm1", cin), ("norm2", cout)):
        sd[f"{key}.{norm}.weight"], sd[f"{key}.{norm}.bias"] = (c,), (c,)
    _conv(sd, f"{key}.conv1", cout, cin, 3)
    _conv(sd, f"{key}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(sd, f"{key}.nin_shortcut", cout, cin, 1)


def _attn(sd: dict, key: str, c: int) -> None:
    sd[f"{key}.norm.weight"], sd[f"{key}.norm.bias"] = (c,), (c,)
    _conv(sd, f"{key}.qkv", 3 * c, c, 1)
    _conv(sd, f"{key}.proj_out", c, c, 1)


def var_vqvae_shapes(
    ch: int = 32, ch_mult: tuple[int, ...] = (1, 1), num_res_blocks: int = 1, z: int = 4, vocab: int = 64
) -> dict[str, tuple]:
    """Tensor names and shapes of VAR's `VQVAE` (models/vqvae.py + basic_vae.py + quant.py), written
    out from that code's module tree: `encoder.down.i.block.j`, `attn.j` with one fused `qkv` conv,
    `decoder.up.i` numbered from full resolution, four shared φ convs `quantize.quant_resi.qresi_ls.k`
    and the per-scale usage buffer `quantize.ema_vocab_hit_SV` [scales, vocab]."""
    sd: dict[str, tuple] = {}
    n = len(ch_mult)
    _conv(sd, "encoder.conv_in", ch, 3, 3)
    block_in = ch
    for i in range(n):
        out = ch * ch_mult[i]
        for j in range(num_res_blocks):
            _resnet(sd, f"encoder.down.{i}.block.{j}", block_in, out)
            block_in = out
            if i == n - 1:
                _attn(sd, f"encoder.down.{i}.attn.{j}", out)
        if i != n - 1:
            _conv(sd, f"encoder.down.{i}.downsample.conv", out, out, 3)
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        _resnet(sd, f"{part}.mid.block_1", c, c)
        _attn(sd, f"{part}.mid.attn_1", c)
        _resnet(sd, f"{part}.mid.block_2", c, c)
    sd["encoder.norm_out.weight"], sd["encoder.norm_out.bias"] = (block_in,), (block_in,)
    _conv(sd, "encoder.conv_out", z, block_in, 3)
    block_in = ch * ch_mult[-1]
    _conv(sd, "decoder.conv_in", block_in, z, 3)
    for i in reversed(range(n)):
        out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            _resnet(sd, f"decoder.up.{i}.block.{j}", block_in, out)
            block_in = out
            if i == n - 1:
                _attn(sd, f"decoder.up.{i}.attn.{j}", out)
        if i != 0:
            _conv(sd, f"decoder.up.{i}.upsample.conv", out, out, 3)
    sd["decoder.norm_out.weight"], sd["decoder.norm_out.bias"] = (block_in,), (block_in,)
    _conv(sd, "decoder.conv_out", 3, block_in, 3)
    sd["quantize.embedding.weight"] = (vocab, z)
    for k in range(4):
        _conv(sd, f"quantize.quant_resi.qresi_ls.{k}", z, z, 3)
    sd["quantize.ema_vocab_hit_SV"] = (len(VAR_PATCH_NUMS), vocab)
    _conv(sd, "quant_conv", z, z, 3)
    _conv(sd, "post_quant_conv", z, z, 3)
    return sd


def var_shapes(depth: int = 2, z: int = 4, vocab: int = 64, num_classes: int = 10) -> dict[str, tuple]:
    """Tensor names and shapes of VAR's transformer (models/var.py + basic_var.py) as
    `build_vae_var` makes it: width 64·depth, heads = depth, l2-normalised attention (so each block
    has `attn.scale_mul_1H11`), per-block `ada_lin`, and the two buffers `lvl_1L`, `attn_bias_for_masking`."""
    c, seq = 64 * depth, sum(p * p for p in VAR_PATCH_NUMS)
    sd: dict[str, tuple] = {
        "word_embed.weight": (c, z),
        "word_embed.bias": (c,),
        "class_emb.weight": (num_classes + 1, c),
        "pos_start": (1, 1, c),
        "pos_1LC": (1, seq, c),
        "lvl_embed.weight": (len(VAR_PATCH_NUMS), c),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        sd[f"{b}.attn.mat_qkv.weight"] = (3 * c, c)
        for name in ("q_bias", "v_bias", "zero_k_bias"):
            sd[f"{b}.attn.{name}"] = (c,)
        sd[f"{b}.attn.scale_mul_1H11"] = (1, depth, 1, 1)
        sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"] = (c, c), (c,)
        sd[f"{b}.ffn.fc1.weight"], sd[f"{b}.ffn.fc1.bias"] = (4 * c, c), (4 * c,)
        sd[f"{b}.ffn.fc2.weight"], sd[f"{b}.ffn.fc2.bias"] = (c, 4 * c), (c,)
        sd[f"{b}.ada_lin.1.weight"], sd[f"{b}.ada_lin.1.bias"] = (6 * c, c), (6 * c,)
    sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"] = (2 * c, c), (2 * c,)
    sd["head.weight"], sd["head.bias"] = (vocab, c), (vocab,)
    return sd


def _filled(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.2
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "norm_out.weight")):
            t = t + 1
        if k.endswith(("zero_k_bias", "ema_vocab_hit_SV")):
            t = torch.zeros(shape)
        sd[k] = t
    return sd


def var_vqvae_state(seed: int = 7, **sizes) -> dict[str, torch.Tensor]:
    """A random VAR VQVAE state dict in the published layout (`var_vqvae_shapes`)."""
    return _filled(var_vqvae_shapes(**sizes), seed)


def var_state(seed: int = 8, depth: int = 2, **sizes) -> dict[str, torch.Tensor]:
    """A random VAR transformer state dict in the published layout, with its level and mask buffers."""
    sd = _filled(var_shapes(depth, **sizes), seed)
    levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(VAR_PATCH_NUMS)])
    sd["lvl_1L"] = levels[None].clone()
    sd["attn_bias_for_masking"] = torch.where(levels[:, None] >= levels[None, :], 0.0, -torch.inf)[None, None]
    return sd


def write_var_pth(folder: Path, depth: int = 2) -> tuple[Path, Path]:
    """`vae_ch160v4096z32.pth` and `var_d{depth}.pth` as FoundationVision publishes them (plain state
    dicts saved with torch.save), for `tessera convert`."""
    folder.mkdir(parents=True, exist_ok=True)
    vae, var = folder / "vae_ch160v4096z32.pth", folder / f"var_d{depth}.pth"
    torch.save(var_vqvae_state(), vae)
    torch.save(var_state(depth=depth), var)
    return vae, var


def write_var(models: Path, depth: int = 2) -> tuple[Path, Path]:
    """The same two models as bare safetensors (the published tensors, no metadata) in
    `vq_models/` and `ar_models/`: every setting must come from the shapes."""
    vae = save(var_vqvae_state(), models / "vq_models" / "vae_ch160v4096z32.safetensors")
    var = save(var_state(depth=depth), models / "ar_models" / f"var_d{depth}.safetensors")
    return vae, var
