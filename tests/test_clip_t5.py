"""CLIP and T5 text encoders and their tokenizers against `transformers` on tiny random configs.

The models must match `CLIPTextModel` / `T5EncoderModel` within 1e-5 relative in fp32 (hidden
states and CLIP's pooled vector), and token ids must equal the `transformers` tokenizers' on
more than 1,000 strings: unicode, empty, very long, truncated at 77, 120, 256 and 512 tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

# transformers is the test-only oracle (the `test` extra); everything it reads is a local folder
import transformers  # the test-only oracle (`test` extra); it reads local folders only
from real_model_fixtures import WORDS, write_clip_tokenizer, write_t5_tokenizer

from tessera.engines.clip import CLIPTextConfig, CLIPTextModel, clip_config_from_weights, eos_positions
from tessera.engines.layouts import text_encoder_from_state_dict
from tessera.engines.t5 import T5Config, T5Encoder, relative_position_bucket, t5_config_from_weights
from tessera.engines.tokenization import TokenizerError, find_tokenizer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("act,eos", [("quick_gelu", 399), ("gelu", 2)])
def test_clip_matches_transformers(act, eos):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=398,
        eos_token_id=eos,
        pad_token_id=399,
    )
    ref = transformers.CLIPTextModel(config).eval()
    sd = ref.state_dict()  # transformers 5 writes it without the `text_model.` prefix; older files have it
    ours = text_encoder_from_state_dict(sd, config.to_dict(), "clip.safetensors")
    assert isinstance(ours, CLIPTextModel)
    ids = torch.randint(0, 398, (4, 77))
    ids[:, 0] = 398
    ids[0, 9:] = 399  # end token then padding with it, as Flux's tokenizer pads
    ids[1, 76] = 399
    ids[2, 40:] = 399
    with torch.no_grad():
        expected = ref(ids)
        hidden, pooled = ours(ids)
    assert _rel(hidden, expected.last_hidden_state) < 1e-5
    assert _rel(pooled, expected.pooler_output) < 1e-5
    if eos != 2:
        assert eos_positions(ids, eos).tolist() == [9, 76, 40, int((ids[3] == 399).int().argmax())]


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers_with_padding_mask(proj):
    torch.manual_seed(1)
    config = transformers.T5Config(
        vocab_size=300,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=3,
        num_heads=4,
        feed_forward_proj=proj,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=40,
    )
    ref = transformers.T5EncoderModel(config).eval()
    ours = text_encoder_from_state_dict(ref.state_dict(), config.to_dict(), "t5.safetensors")
    assert isinstance(ours, T5Encoder)
    assert ours.config.relative_attention_max_distance == 40  # from config.json, not the default 128
    ids = torch.randint(2, 300, (3, 130))
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    ids[1, 50:] = 0
    with torch.no_grad():
        for m in (mask, None):
            expected = ref(input_ids=ids, attention_mask=m).last_hidden_state
            got = ours(ids, m)
            assert _rel(got, expected) < 1e-5


def test_relative_buckets_are_bidirectional_and_saturate():
    rel = torch.arange(-300, 301)
    b = relative_position_bucket(rel, 32, 128)
    assert b[300] == 0 and b[301] == 17 and b[299] == 1  # 0, +1 (second half), -1
    assert b.max() == 31 and b.min() == 0
    assert b[0] == b[1] == 15 and b[-1] == 31  # beyond max_distance every distance shares the last bucket


def test_t5_fp16_clamps_instead_of_overflowing():
    torch.manual_seed(2)
    config = transformers.T5Config(
        vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
    )
    sd = transformers.T5EncoderModel(config).state_dict()
    sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = torch.full_like(
        sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"], 3e4
    )
    model = text_encoder_from_state_dict(sd, {}, "t5.safetensors", dtype=torch.float16)
    out = model(torch.randint(0, 50, (1, 8)))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# ---------------------------------------------------------------- tokenizers


def _strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    specials = ["", " ", "\t\n", "<|endoftext|>", "</s> <pad>", "A  B\u3000C", "e\u0301 é ｆｕｌｌ"]
    out = list(specials)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.4:
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
            out.append(" ".join(w.upper() if rng.random() < 0.2 else w for w in words))
        elif kind < 0.7:
            pools = [
                (0x20, 0x7E),
                (0xA0, 0x17F),
                (0x370, 0x3FF),
                (0x4E00, 0x4E80),
                (0x1F600, 0x1F64F),
                (0x300, 0x36F),
            ]
            chars = []
            for _ in range(rng.randint(0, 60)):
                lo, hi = rng.choice(pools)
                chars.append(chr(rng.randint(lo, hi)))
            out.append("".join(chars))
        else:  # very long prompts: truncation at every length
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 700))))
    return out


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return write_clip_tokenizer(root / "clip"), write_t5_tokenizer(root / "t5")


def test_clip_token_ids_equal_transformers_on_1000_strings(tokenizer_dirs):
    clip_dir, _ = tokenizer_dirs
    ref = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    ours = find_tokenizer("clip", [clip_dir])
    texts = _strings(1100)
    ids, mask = ours(texts, 77)
    expected = ref(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask.bool())
    assert (ids[:, 0] == ref.bos_token_id).all() and (mask.sum(1) == 77).any()  # some were truncated
    truncated = mask.sum(1) == 77
    assert (ids[truncated, 76] == ref.eos_token_id).all()  # the end token survives truncation


@pytest.mark.parametrize("length", [120, 256, 512])
def test_t5_token_ids_equal_transformers_on_1000_strings(tokenizer_dirs, length):
    _, t5_dir = tokenizer_dirs
    ref = transformers.T5Tokenizer.from_pretrained(str(t5_dir))
    ours = find_tokenizer("t5", [t5_dir])
    texts = _strings(1100, seed=length)
    ids, mask = ours(texts, length)
    expected = ref(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask.bool())
    assert (mask.sum(1) == length).any() and (mask.sum(1) == 1).any()  # truncated ones and empty ones


def test_tokenizer_of_another_family_is_skipped_and_a_miss_names_file_and_repo(tokenizer_dirs, tmp_path):
    clip_dir, t5_dir = tokenizer_dirs
    assert find_tokenizer("clip", [t5_dir, clip_dir]).source == clip_dir
    with pytest.raises(TokenizerError) as e:
        find_tokenizer("t5", [clip_dir, tmp_path / "nowhere"])
    assert (
        "tokenizer.json" in str(e.value)
        and "google/flan-t5-xl" in str(e.value)
        and str(clip_dir) in str(e.value)
    )
    with pytest.raises(TokenizerError, match="only 10 rows"):
        find_tokenizer("clip", [clip_dir], vocab_size=10)


def test_unknown_clip_width_without_head_count_is_refused():
    sd = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=40, hidden_size=48, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4
        )
    ).state_dict()
    with pytest.raises(ValueError, match="num_attention_heads"):
        text_encoder_from_state_dict(sd, {}, "odd_clip.safetensors")
    assert (
        text_encoder_from_state_dict(
            sd, {"num_attention_heads": 4}, "odd_clip.safetensors"
        ).config.num_attention_heads
        == 4
    )


def test_real_sizes_are_read_off_the_shapes_alone():
    """CLIP-L, T5-XXL (Flux) and FLAN-T5-XL (LlamaGen) as their files come: no config beside them."""
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig()).state_dict()
        t5xxl = T5Encoder(T5Config()).state_dict()
        flan_xl = T5Encoder(T5Config(d_model=2048, d_ff=5120, num_heads=32)).state_dict()
    assert clip_config_from_weights(clip_l, {}) == CLIPTextConfig()  # 12 heads, quick-GELU, 77 positions
    assert t5_config_from_weights(t5xxl, {}) == T5Config()
    flan = t5_config_from_weights(flan_xl, {})
    assert (flan.d_model, flan.num_heads, flan.d_kv, flan.d_ff, flan.num_layers) == (2048, 32, 64, 5120, 24)
