"""Prompt -> token ids for the real text encoders, through Hugging Face `tokenizers`.

A tokenizer is read from `tokenizer.json`, or for CLIP from `vocab.json` + `merges.txt` (the
files OpenAI's and diffusers' CLIP folders ship), assembled from `tokenizers`' own BPE,
normalizer and pre-tokenizer pieces the way CLIP's tokenizer is defined. No BPE or
sentencepiece is written here: `tokenizers` does the work.

Where the files are looked for is the caller's list of folders (next to the weights, the
diffusers pipeline's tokenizer folder, `models/tokenizers/<name>/`); `find_tokenizer` takes the
first folder whose files fit the encoder family, and a miss is an error naming the files and
the model repository they come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

# Per family: the special tokens its tokenizer must have, its pad token, and where to get it.
FAMILIES = {
    "clip": {
        "needs": ("<|startoftext|>", "<|endoftext|>"),
        "pad": "<|endoftext|>",
        "folder": "clip-vit-large-patch14",
        "repo": "openai/clip-vit-large-patch14 (tokenizer.json, or vocab.json + merges.txt)",
    },
    "t5": {
        "needs": ("</s>", "<pad>"),
        "pad": "<pad>",
        "folder": "t5-v1_1-xxl",
        "repo": "google/flan-t5-xl or black-forest-labs/FLUX.1-schnell tokenizer_2/ (tokenizer.json)",
    },
}


class TokenizerError(ValueError):
    """No usable tokenizer; the message names the files, the folders searched and the source repo."""


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the pad id, with one batch call shaped for the encoders."""

    tokenizer: Tokenizer
    pad_id: int
    source: Path

    def __call__(
        self, texts: list[str], max_length: int, pad_to_max: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids [B, L] and mask [B, L] (True on real tokens): special tokens added, truncated to
        `max_length` (keeping the end token), right-padded to `max_length` or to the longest."""
        tok = self.tokenizer
        tok.enable_truncation(max_length=max_length)
        pad_token = tok.id_to_token(self.pad_id)
        if pad_to_max:
            tok.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=max_length)
        else:
            tok.enable_padding(pad_id=self.pad_id, pad_token=pad_token)
        encodings = tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool)
        return ids, mask

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.source}: tokenizer has no {token!r} token")
        return i


def clip_tokenizer_from_bpe(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """CLIP's tokenizer from its BPE files: NFC + whitespace squeeze + lower-case, CLIP's word
    split, byte-level BPE with '</w>' word ends, and <|startoftext|> … <|endoftext|> around each prompt."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    merges = []
    for line in Path(merges_file).read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        a, b = line.split()
        merges.append((a, b))
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", eos), ("<|startoftext|>", bos), trim_offsets=False, add_prefix_space=False
    )
    return tok


def _pad_token(folder: Path, default: str) -> str:
    """The pad token a folder's special_tokens_map.json / tokenizer_config.json names, else the family's."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise TokenizerError(f"{f}: not a JSON object ({e})") from None
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str):
            return pad
    return default


def _read(folder: Path, family: str) -> Tokenizer | None:
    """The tokenizer in `folder` for `family`, or None when its files are absent or do not fit."""
    try:
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif family == "clip" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = clip_tokenizer_from_bpe(folder / "vocab.json", folder / "merges.txt")
        else:
            return None
    except Exception as e:  # the library's parse errors name neither the file nor the folder
        raise TokenizerError(f"{folder}: cannot read its tokenizer files ({e})") from None
    if any(tok.token_to_id(t) is None for t in FAMILIES[family]["needs"]):
        return None  # another family's tokenizer (e.g. T5's beside a CLIP file)
    return tok


def find_tokenizer(family: str, folders: list[Path], vocab_size: int | None = None) -> TextTokenizer:
    """The first tokenizer for `family` ("clip" or "t5") in `folders`; ids must fit `vocab_size`."""
    info = FAMILIES[family]
    for folder in folders:
        if not folder.is_dir():
            continue
        tok = _read(folder, family)
        if tok is None:
            continue
        if vocab_size is not None and tok.get_vocab_size(with_added_tokens=True) > vocab_size:
            raise TokenizerError(
                f"{folder}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                f"{family.upper()} encoder's embedding has only {vocab_size} rows (tokenizer of another model?)"
            )
        pad = _pad_token(folder, info["pad"])
        pad_id = tok.token_to_id(pad)
        if pad_id is None:
            raise TokenizerError(f"{folder}: tokenizer has no pad token {pad!r}")
        return TextTokenizer(tok, pad_id, folder)
    searched = ", ".join(str(f) for f in folders)
    files = "tokenizer.json (or vocab.json + merges.txt)" if family == "clip" else "tokenizer.json"
    raise TokenizerError(
        f"no {family.upper()} tokenizer found: put {files} from {info['repo']} in one of: {searched}"
    )
