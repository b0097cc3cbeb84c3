"""Every checkpoint layout loads through the nodes, told from the files (never their names), and
every bad file fails with the node, the input and the file named.

Layouts: ComfyUI single files (clip_l, t5xxl_fp16), a sharded Hugging Face folder (FLAN-T5-XL),
a diffusers pipeline folder written by diffusers itself (FLUX with non-default RoPE axes, VAE norm
groups, scale and shift, checked against diffusers and transformers outputs) and an all-in-one
checkpoint (`model.diffusion_model.*`, `vae.*`, `text_encoders.*`).
"""

from __future__ import annotations

import os

import pytest
import torch
from real_model_fixtures import (
    CLIP,
    FLAN,
    GPT_T2I,
    T5,
    clip_state,
    save,
    t5_state,
    write_clip_tokenizer,
    write_flux,
    write_llamagen,
    write_t5_tokenizer,
)

from tessera.engines.conditioning import Conditioning
from tessera.engines.flux import Flux
from tessera.engines.gpt import GPT
from tessera.engines.layouts import detect_family, locate, read_weights
from tessera.engines.vae import AutoencoderKL
from tessera.executor import Executor
from tessera.node import NodeError
from tessera.nodes.diffusion import (
    DiTSampler,
    EmptyLatent,
    LoadCheckpoint,
    LoadDiffusersPipeline,
    LoadDiffusionModel,
    LoadVAE,
)
from tessera.nodes.text import (
    IMAGENET_CLASSES,
    CLIPLoader,
    DualCLIPLoader,
    FluxTextEncode,
    ImageNetClass,
    LlamaGenTextEncode,
)
from tessera.registry import default_registry


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_flux(root)
    write_llamagen(root, "t2i")
    return root


@pytest.fixture(scope="module")
def executor(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    return Executor(default_registry(None), models, out / "in", out / "out", "cpu")


def run(executor, node_cls, **inputs):
    return node_cls().execute(executor.context("n1"), **inputs)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].float(), sb[k].float()), k


# ---------------------------------------------------------------- layouts that load


def test_comfyui_single_files_load_with_tokenizers_from_models_tokenizers(executor, models):
    (clip_only,) = run(executor, CLIPLoader, file="clip_l.safetensors")
    assert clip_only.clip is not None and clip_only.t5 is None
    assert clip_only.clip[0].config.num_attention_heads == 8  # width 512: a known CLIP size
    assert clip_only.clip[1].source == models / "tokenizers" / "clip-vit-large-patch14"
    (both,) = run(executor, DualCLIPLoader, clip_file="clip_l.safetensors", t5_file="t5xxl_fp16.safetensors")
    assert both.t5[0].config.num_heads == T5.num_heads and both.t5[1].source.name == "t5-v1_1-xxl"
    assert locate(models / "text_encoders" / "clip_l.safetensors").layout == "single file"


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no fp8 dtype")
def test_fp8_stored_t5_loads_upcast_to_the_compute_dtype(executor, models):
    """ComfyUI's t5xxl_fp8_e4m3fn.safetensors: fp8 weights, upcast when loaded (fp32 on the CPU)."""
    sd = t5_state()
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    save(fp8, models / "text_encoders" / "t5xxl_fp8_e4m3fn.safetensors")
    (enc,) = run(executor, CLIPLoader, file="t5xxl_fp8_e4m3fn.safetensors")
    weight = enc.t5[0].encoder.block[0].layer[0].SelfAttention.q.weight
    expected = fp8["encoder.block.0.layer.0.SelfAttention.q.weight"].float()
    assert weight.dtype == torch.float32 and torch.equal(weight, expected)
    feats, _ = enc.t5_encode(["a cat"], 8, masked=True)
    assert torch.isfinite(feats).all()


def test_sharded_hf_folder_loads_from_any_shard_with_its_own_tokenizer(executor, models):
    folder = models / "text_encoders" / "flan-t5-xl"
    where = locate(folder / "model-00002-of-00002.safetensors")
    assert where.layout == "hf sharded" and len(where.files) == 2 and where.config["d_model"] == FLAN.d_model
    (enc,) = run(executor, CLIPLoader, file="flan-t5-xl/model-00002-of-00002.safetensors")
    assert enc.t5[1].source == folder and enc.t5[0].config.num_heads == FLAN.num_heads
    sd, _, _ = read_weights(folder / "model-00001-of-00002.safetensors")
    assert torch.equal(enc.t5[0].shared.weight, sd["shared.weight"])


def test_all_in_one_checkpoint_splits_into_model_vae_and_text_encoders(executor, models):
    parts = {
        "model.diffusion_model.": read_weights(models / "diffusion_models" / "flux1-schnell.safetensors")[0],
        "vae.": read_weights(models / "vae" / "ae.safetensors")[0],
        "text_encoders.clip_l.transformer.": clip_state(),
        "text_encoders.t5xxl.transformer.": t5_state(),
    }
    sd = {prefix + k: v for prefix, part in parts.items() for k, v in part.items()}
    save(sd, models / "checkpoints" / "flux1-schnell-fp8.safetensors")
    assert detect_family(sd) == "all-in-one checkpoint"
    model, vae, enc = run(executor, LoadCheckpoint, file="flux1-schnell-fp8.safetensors")
    (alone,) = run(executor, LoadDiffusionModel, file="flux1-schnell.safetensors")
    assert_same_weights(model, alone)
    assert isinstance(vae, AutoencoderKL) and vae.config.latent_channels == 16
    assert enc.clip is not None and enc.t5 is not None  # tokenizers found in models/tokenizers/
    (flux,) = run(executor, FluxTextEncode, text_encoder=enc, text="a cat", t5_tokens=16, guidance=3.5)
    assert flux.tokens.shape == (1, 16, T5.d_model) and flux.pooled.shape == (1, CLIP.hidden_size)


@pytest.fixture(scope="module")
def pipeline(models, tmp_path_factory):
    """A FLUX pipeline folder written by diffusers' own save_pretrained, with settings off the defaults."""
    import diffusers
    import transformers

    tok_root = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5.d_model,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # not what a head of 16 gives by default (2, 6, 8)
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.7,
        shift_factor=0.2,
    )
    for model in (transformer, vae):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.15)
    clip_config = transformers.CLIPTextConfig(
        vocab_size=CLIP.vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=64,
    )
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=transformers.CLIPTextModel(clip_config).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(
            str(write_clip_tokenizer(tok_root / "clip")), model_max_length=77
        ),
        text_encoder_2=transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=T5.vocab_size,
                d_model=T5.d_model,
                d_kv=T5.d_kv,
                d_ff=T5.d_ff,
                num_layers=2,
                num_heads=T5.num_heads,
                feed_forward_proj="gated-gelu",
                relative_attention_max_distance=20,
            )
        ).eval(),
        tokenizer_2=transformers.T5Tokenizer.from_pretrained(str(write_t5_tokenizer(tok_root / "t5"))),
        transformer=transformer.eval(),
    )
    folder = models / "diffusion_models" / "FLUX.1-tiny"
    pipe.save_pretrained(str(folder), max_shard_size="100KB")
    return pipe, folder


def test_diffusers_pipeline_honours_every_config_and_matches_diffusers(executor, pipeline):
    pipe, folder = pipeline
    assert (folder / "model_index.json").is_file()
    last_shard = sorted((folder / "transformer").glob("*.safetensors"))[-1]
    model, vae, enc = run(
        executor, LoadDiffusersPipeline, file=last_shard.relative_to(folder.parent).as_posix()
    )
    assert locate(last_shard).layout == "diffusers sharded"
    assert model.config.axes_dim == (4, 4, 8)  # from transformer/config.json
    assert (vae.config.norm_groups, vae.config.scaling_factor, vae.config.shift_factor) == (4, 0.7, 0.2)
    assert enc.t5[0].config.relative_attention_max_distance == 20
    assert enc.clip[1].source == folder / "tokenizer" and enc.t5[1].source == folder / "tokenizer_2"

    prompt = "a watercolor fox under a tree, ünïcödé 東京"
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=64)
    (cond,) = run(executor, FluxTextEncode, text_encoder=enc, text=prompt, t5_tokens=64, guidance=2.5)
    assert cond.guidance == 2.5 and cond.mask.all()
    assert ((cond.tokens - embeds).abs().max() / embeds.abs().max()) < 1e-5
    assert ((cond.pooled - pooled).abs().max() / pooled.abs().max()) < 1e-5

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 6, generator=g), torch.tensor([0.6])  # diffusers' in_channels 16 = 4 x 2 x 2
    packed = x.reshape(1, 4, 4, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 12, 16)
    ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(3.0), indexing="ij"), -1
    ).reshape(-1, 3)
    with torch.no_grad():
        expected = pipe.transformer(
            packed, embeds, pooled, t, ids, torch.zeros(64, 3), torch.tensor([2.5])
        ).sample
        ours = model(x, t, cond.tokens, cond.pooled, torch.tensor([2.5]))
    ours_packed = ours.reshape(1, 4, 4, 2, 3, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 12, 16)
    assert ((ours_packed - expected).norm() / expected.norm()) < 1e-4

    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        expected = pipe.vae.decode(z / 0.7 + 0.2).sample
        assert ((vae.decode(z) - expected).abs().max() / expected.abs().max()) < 1e-4


# ---------------------------------------------------------------- conditioning per family


def test_llamagen_caption_is_lower_cased_and_left_padded_with_the_mask_flipped(executor, models):
    (enc,) = run(executor, CLIPLoader, file="flan-t5-xl/model-00001-of-00002.safetensors")
    (cond,) = run(
        executor, LlamaGenTextEncode, text_encoder=enc, text=" A Red Fox in the SNOW ", max_tokens=120
    )
    feats, mask = enc.t5_encode(["a red fox in the snow"], 120, masked=True)
    n = int(mask.sum())
    assert 1 < n < 120 and cond.tokens.shape == (1, 120, FLAN.d_model)
    assert not cond.mask[0, : 120 - n].any() and cond.mask[0, 120 - n :].all()  # padding first
    assert torch.equal(cond.tokens[0, 120 - n :], feats[0, :n])  # LlamaGen: cat(emb[valid:], emb[:valid])
    assert torch.equal(cond.tokens[0, : 120 - n], feats[0, n:])
    gpt = GPT(GPT_T2I)
    left, valid = gpt.caption_features(cond)
    right, valid_r = gpt.caption_features(Conditioning(feats, cond.pooled, mask))
    assert torch.equal(left, right) and torch.equal(valid, valid_r)  # the GPT sees the same prefix either way


def test_encode_nodes_refuse_encoders_that_lack_what_the_family_needs(executor):
    (clip_only,) = run(executor, CLIPLoader, file="clip_l.safetensors")
    with pytest.raises(
        NodeError, match="FluxTextEncode needs CLIP and T5 but the text encoder has CLIP"
    ) as e:
        run(executor, FluxTextEncode, text_encoder=clip_only, text="x", t5_tokens=8, guidance=1.0)
    assert e.value.input == "text_encoder"
    with pytest.raises(NodeError, match="LlamaGenTextEncode needs T5"):
        run(executor, LlamaGenTextEncode, text_encoder=clip_only, text="x", max_tokens=120)


def test_flux_sampler_refuses_clip_only_conditioning_by_name(executor):
    (model,) = run(executor, LoadDiffusionModel, file="flux1-schnell.safetensors")
    (clip_only,) = run(executor, CLIPLoader, file="clip_l.safetensors")
    cond = clip_only.encode(["a cat"])
    (latent,) = run(executor, EmptyLatent, width=32, height=32, batch_size=1, channels=16)
    with pytest.raises(NodeError, match=r"made by CLIP\).*T5-XXL tokens and CLIP-L pooled") as e:
        run(
            executor,
            DiTSampler,
            model=model,
            positive=cond,
            latent=latent,
            sampler="euler",
            schedule="linear",
            steps=1,
            cfg=1.0,
            guidance=3.5,
            seed=0,
            denoise=1.0,
        )
    assert e.value.input == "positive"


def test_imagenet_class_node_lists_the_1000_classes_in_id_order(executor):
    assert len(IMAGENET_CLASSES) == len(set(IMAGENET_CLASSES)) == 1000
    assert IMAGENET_CLASSES[0] == "0: tench" and IMAGENET_CLASSES[999] == "999: toilet tissue"
    assert run(executor, ImageNetClass, class_name="281: tabby") == (281,)


# ---------------------------------------------------------------- bad files


def test_wrong_family_file_names_node_input_and_file(executor, models):
    with pytest.raises(NodeError) as e:
        run(executor, DualCLIPLoader, clip_file="t5xxl_fp16.safetensors", t5_file="t5xxl_fp16.safetensors")
    assert e.value.input == "clip_file"
    assert "DualCLIPLoader" in str(e.value) and "t5xxl_fp16.safetensors holds a T5" in str(e.value)

    gpt = (models / "ar_models" / "llamagen_t2i_XL_stage2_512.safetensors").read_bytes()
    (models / "text_encoders" / "llamagen_t2i_copy.safetensors").write_bytes(gpt)
    with pytest.raises(
        NodeError, match=r"CLIPLoader: llamagen_t2i_copy.safetensors: .*LlamaGen GPT, not a CLIP or T5"
    ):
        run(executor, CLIPLoader, file="llamagen_t2i_copy.safetensors")

    dit = (models / "diffusion_models" / "flux1-schnell.safetensors").read_bytes()
    (models / "vae" / "flux_copy.safetensors").write_bytes(dit)
    with pytest.raises(
        NodeError, match=r"flux_copy.safetensors: not an AutoencoderKL VAE: this file holds a Flux DiT"
    ):
        run(executor, LoadVAE, file="flux_copy.safetensors")
    with pytest.raises(
        NodeError, match=r"LoadCheckpoint: flux1-schnell.safetensors is not an all-in-one checkpoint"
    ):
        (models / "checkpoints").mkdir(exist_ok=True)
        (models / "checkpoints" / "flux1-schnell.safetensors").write_bytes(dit)
        run(executor, LoadCheckpoint, file="flux1-schnell.safetensors")


def test_missing_tokenizer_names_the_file_and_the_repository(executor, models, tmp_path):
    other = tmp_path / "m"
    save(clip_state(), other / "text_encoders" / "clip_l.safetensors")
    ex = Executor(default_registry(None), other, tmp_path / "in", tmp_path / "out", "cpu")
    with pytest.raises(NodeError) as e:
        run(ex, CLIPLoader, file="clip_l.safetensors")
    msg = str(e.value)
    assert e.value.input == "file" and "CLIPLoader: clip_l.safetensors" in msg
    assert "vocab.json + merges.txt" in msg and "openai/clip-vit-large-patch14" in msg
    assert str(other / "tokenizers" / "clip-vit-large-patch14") in msg


def test_truncated_shard_and_index_naming_a_missing_shard_are_named(executor, models, tmp_path):
    import shutil

    folder = models / "text_encoders" / "broken-t5"
    shutil.copytree(models / "text_encoders" / "flan-t5-xl", folder)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(NodeError, match=r"CLIPLoader: .*model-00002-of-00002.safetensors.*truncated") as e:
        run(executor, CLIPLoader, file="broken-t5/model-00001-of-00002.safetensors")
    assert e.value.input == "file"
    shard.unlink()
    with pytest.raises(
        NodeError,
        match=r"model.safetensors.index.json: names shard 'model-00002-of-00002.safetensors', which is missing",
    ):
        run(executor, CLIPLoader, file="broken-t5/model-00001-of-00002.safetensors")


def test_bad_files_are_refused_before_anything_runs_naming_node_input_and_file(executor):
    workflow = {
        "version": 1,
        "nodes": {
            "7": {
                "type": "DualCLIPLoader",
                "inputs": {"clip_file": "clip_l.safetensors", "t5_file": "clip_l.safetensors"},
            },
            "8": {
                "type": "FluxTextEncode",
                "inputs": {"text_encoder": {"node": "7", "output": "text_encoder"}, "text": "x"},
            },
            "9": {"type": "LoadDiffusionModel", "inputs": {"file": "flux1-schnell.safetensors"}},
            "10": {"type": "EmptyLatent", "inputs": {"width": 32, "height": 32, "channels": 16}},
            "11": {
                "type": "DiTSampler",
                "inputs": {
                    "model": {"node": "9", "output": "model"},
                    "positive": {"node": "8", "output": "conditioning"},
                    "latent": {"node": "10", "output": "latent"},
                    "steps": 1,
                },
            },
        },
    }
    events = []
    result = executor.run(workflow, emit=lambda kind, data: events.append(kind), targets=["11"])
    assert result.status == "error"
    err = result.errors[0]
    assert (err["node"], err["input"]) == ("7", "t5_file") and "clip_l.safetensors holds a CLIP" in err[
        "message"
    ]
    assert "execution_start" not in events  # refused when compiled, from the file headers alone

    workflow["nodes"]["7"] = {"type": "CLIPLoader", "inputs": {"file": "no_such_encoder.safetensors"}}
    result = executor.run(workflow, targets=["11"])
    assert (result.errors[0]["node"], result.errors[0]["input"]) == ("7", "file")
    assert "no_such_encoder.safetensors" in result.errors[0]["message"]


def test_a_changed_shard_config_or_tokenizer_changes_the_loader_cache_key(executor, models):
    """The runtime keys a loader on its chosen file; the loader adds every other file it reads."""
    folder = models / "text_encoders" / "flan-t5-xl"
    ctx = executor.context("n1")
    key = CLIPLoader.fingerprint(ctx, {"file": "flan-t5-xl/model-00001-of-00002.safetensors"})
    for changed in ("model-00002-of-00002.safetensors", "config.json", "tokenizer.json"):
        stat = (folder / changed).stat()
        os.utime(folder / changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        again = CLIPLoader.fingerprint(ctx, {"file": "flan-t5-xl/model-00001-of-00002.safetensors"})
        assert again != key, changed
        key = again


def test_converted_llamagen_and_bfl_single_file_keep_what_their_files_say(executor, models):
    from tessera.engines.gpt import load_gpt

    gpt = load_gpt(models / "ar_models" / "llamagen_t2i_XL_stage2_512.safetensors")
    assert (
        gpt.config.cls_token_num == 120 and gpt.config.caption_dim == FLAN.d_model and gpt.config.n_head == 2
    )
    (model,) = run(executor, LoadDiffusionModel, file="flux1-schnell.safetensors")
    assert isinstance(model, Flux) and model.config.axes_dim == (2, 6, 8)  # Flux's split of a 16-wide head
    assert not model.config.guidance_embed
