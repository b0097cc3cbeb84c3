"""`tessera models list|pull`: the real models Tessera runs, fetched from the Hugging Face Hub on request.

A catalogue names each model's files and the `models/` folder each belongs in. Pulling is
only ever done by this command (no loader downloads anything). Files arrive through
`huggingface_hub` (its HTTP client, auth headers, retries and progress bar) into
`models/.downloads/`, where a partial file survives an interruption and the next pull resumes
it with a Range request; a finished file is checked against the Hub's checksum (the sha256
of an LFS file, the git blob sha1 of a small one) before it is moved into place, and a
mismatch is downloaded once more, then refused. LlamaGen publishes PyTorch pickles: those
are converted to safetensors with `tessera.convert` (weights only, no code runs).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

GB = 1e9


@dataclass(frozen=True)
class HubFile:
    repo: str  # "owner/name" on the Hub
    path: str  # the file's path in the repository
    target: str  # where it goes, relative to models/ (a .pt becomes this .safetensors)
    size: float  # approximate bytes, for `models list`

    @property
    def needs_convert(self) -> bool:
        return Path(self.path).suffix in (".pt", ".pth", ".bin") and self.target.endswith(".safetensors")


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    description: str
    files: tuple[HubFile, ...] = ()
    includes: tuple[str, ...] = ()  # other entries pulled with this one
    gated: bool = False  # the repository asks users to accept a licence first
    licence: str = ""


def _f(repo: str, path: str, target: str, gb: float) -> HubFile:
    return HubFile(repo, path, target, gb * GB)


BFL_SCHNELL, BFL_DEV = "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev"
COMFY_TE, LLAMAGEN = "comfyanonymous/flux_text_encoders", "FoundationVision/LlamaGen"
LLAMAGEN_T2I, FLAN_T5 = "peizesun/llamagen_t2i", "google/flan-t5-xl"
VAR = "FoundationVision/var"
# Where engines/tokenization.py looks for tokenizers. T5 v1.1 and FLAN-T5 share one sentencepiece
# vocabulary, so T5-XXL's tokenizer.json comes from the open FLAN-T5 repository.
CLIP_TOK, T5_TOK = "tokenizers/clip-vit-large-patch14", "tokenizers/t5-v1_1-xxl"

_ENTRIES = (
    CatalogueEntry(
        "flux-vae",
        "Flux.1 autoencoder (16 latent channels)",
        (_f(BFL_SCHNELL, "ae.safetensors", "vae/ae.safetensors", 0.34),),
        gated=True,
        licence="apache-2.0",
    ),
    CatalogueEntry(
        "clip-l",
        "CLIP-L/14 text encoder (ComfyUI single file) and its tokenizer",
        (
            _f(COMFY_TE, "clip_l.safetensors", "text_encoders/clip_l.safetensors", 0.25),
            _f("openai/clip-vit-large-patch14", "vocab.json", f"{CLIP_TOK}/vocab.json", 0.001),
            _f("openai/clip-vit-large-patch14", "merges.txt", f"{CLIP_TOK}/merges.txt", 0.0005),
        ),
        licence="mit",
    ),
    CatalogueEntry(
        "t5xxl-fp16",
        "T5 v1.1 XXL encoder in fp16 (ComfyUI single file) and its tokenizer",
        (
            _f(COMFY_TE, "t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp16.safetensors", 9.79),
            _f(FLAN_T5, "tokenizer.json", f"{T5_TOK}/tokenizer.json", 0.0024),
        ),
        licence="apache-2.0",
    ),
    CatalogueEntry(
        "t5xxl-fp8",
        "T5 v1.1 XXL encoder stored in fp8 e4m3fn (half the memory) and its tokenizer",
        (
            _f(COMFY_TE, "t5xxl_fp8_e4m3fn.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors", 4.89),
            _f(FLAN_T5, "tokenizer.json", f"{T5_TOK}/tokenizer.json", 0.0024),
        ),
        licence="apache-2.0",
    ),
    CatalogueEntry(
        "flux1-schnell",
        "Flux.1-schnell 12B DiT (4 steps) with its VAE, CLIP-L and T5-XXL",
        (_f(BFL_SCHNELL, "flux1-schnell.safetensors", "diffusion_models/flux1-schnell.safetensors", 23.8),),
        includes=("flux-vae", "clip-l", "t5xxl-fp16"),
        gated=True,
        licence="apache-2.0",
    ),
    CatalogueEntry(
        "flux1-dev",
        "Flux.1-dev 12B guidance-distilled DiT with its VAE, CLIP-L and T5-XXL",
        (_f(BFL_DEV, "flux1-dev.safetensors", "diffusion_models/flux1-dev.safetensors", 23.8),),
        includes=("flux-vae", "clip-l", "t5xxl-fp16"),
        gated=True,
        licence="flux-1-dev-non-commercial",
    ),
    CatalogueEntry(
        "llamagen-vq-c2i",
        "LlamaGen VQ-16 image tokenizer for the class-conditional GPTs",
        (_f(LLAMAGEN, "vq_ds16_c2i.pt", "vq_models/llamagen_vq_ds16_c2i.safetensors", 0.29),),
        licence="mit",
    ),
    CatalogueEntry(
        "llamagen-c2i",
        "LlamaGen-XL class-conditional GPT (775M, 384 px, ImageNet) with its VQ",
        (_f(LLAMAGEN, "c2i_XL_384.pt", "ar_models/llamagen_c2i_XL_384.safetensors", 3.1),),
        includes=("llamagen-vq-c2i",),
        licence="mit",
    ),
    CatalogueEntry(
        "flan-t5-xl",
        "FLAN-T5-XL (Hugging Face folder), LlamaGen t2i's caption encoder",
        tuple(
            _f(FLAN_T5, p, f"text_encoders/flan-t5-xl/{p}", gb)
            for p, gb in (
                ("config.json", 0.000002),
                ("model.safetensors.index.json", 0.00005),
                ("model-00001-of-00002.safetensors", 9.45),
                ("model-00002-of-00002.safetensors", 1.95),
                ("tokenizer.json", 0.0024),
                ("tokenizer_config.json", 0.00003),
                ("special_tokens_map.json", 0.000002),
                ("spiece.model", 0.0008),
            )
        ),
        licence="apache-2.0",
    ),
    CatalogueEntry(
        "llamagen-t2i",
        "LlamaGen-XL text-to-image GPT (775M, 512 px) with its VQ and FLAN-T5-XL",
        (
            _f(LLAMAGEN_T2I, "t2i_XL_stage2_512.pt", "ar_models/llamagen_t2i_XL_stage2_512.safetensors", 3.1),
            _f(LLAMAGEN_T2I, "vq_ds16_t2i.pt", "vq_models/llamagen_vq_ds16_t2i.safetensors", 0.29),
        ),
        includes=("flan-t5-xl",),
        licence="mit",
    ),
    CatalogueEntry(
        "var-vq",
        "VAR's multi-scale residual VQ tokenizer (4,096 codes, 10 scales up to 16x16)",
        (_f(VAR, "vae_ch160v4096z32.pth", "vq_models/var_vae_ch160v4096z32.safetensors", 0.44),),
        licence="mit",
    ),
    CatalogueEntry(
        "var-d16",
        "VAR-d16 next-scale class-conditional transformer (310M, 256 px, ImageNet) with its tokenizer",
        (_f(VAR, "var_d16.pth", "ar_models/var_d16.safetensors", 1.25),),
        includes=("var-vq",),
        licence="mit",
    ),
    CatalogueEntry(
        "var-d20",
        "VAR-d20 next-scale class-conditional transformer (600M, 256 px, ImageNet) with its tokenizer",
        (_f(VAR, "var_d20.pth", "ar_models/var_d20.safetensors", 2.4),),
        includes=("var-vq",),
        licence="mit",
    ),
    CatalogueEntry(
        "var-d24",
        "VAR-d24 next-scale class-conditional transformer (1.0B, 256 px, ImageNet) with its tokenizer",
        (_f(VAR, "var_d24.pth", "ar_models/var_d24.safetensors", 4.1),),
        includes=("var-vq",),
        licence="mit",
    ),
    CatalogueEntry(
        "var-d30",
        "VAR-d30 next-scale class-conditional transformer (2.0B, 256 px, ImageNet) with its tokenizer",
        (_f(VAR, "var_d30.pth", "ar_models/var_d30.safetensors", 8.0),),
        includes=("var-vq",),
        licence="mit",
    ),
)
CATALOGUE: dict[str, CatalogueEntry] = {e.name: e for e in _ENTRIES}
GATED_REPOS = {f.repo for e in _ENTRIES if e.gated for f in e.files}


class HubError(RuntimeError):
    """A pull that cannot complete; the message says which file and what to do."""


def files_of(name: str) -> list[HubFile]:
    """Every file an entry needs, its inclusions first, each target once."""
    if name not in CATALOGUE:
        raise HubError(f"no model '{name}' in the catalogue (known: {', '.join(CATALOGUE)})")
    entry, out = CATALOGUE[name], []
    for inc in entry.includes:
        out += files_of(inc)
    out += entry.files
    seen: set[str] = set()
    return [f for f in out if not (f.target in seen or seen.add(f.target))]


def is_installed(models_dir: Path, f: HubFile) -> bool:
    return (models_dir / f.target).is_file()


def list_lines(models_dir: Path) -> list[str]:
    """One line per catalogue entry: name, size still to fetch, installed state, gating, description."""
    lines = []
    for name, entry in CATALOGUE.items():
        files = files_of(name)
        missing = [f for f in files if not is_installed(models_dir, f)]
        state = "installed" if not missing else f"{len(files) - len(missing)}/{len(files)} files"
        size = sum(f.size for f in files) / GB
        gate = " (gated: accept the licence on the Hub, then set HF_TOKEN)" if entry.gated else ""
        lines.append(f"{name:16} {size:6.1f} GB  {state:12} {entry.description}{gate}")
    return lines


# ------------------------------------------------------------------------------ download


def _expected_digest(etag: str) -> tuple[str, str] | None:
    """(algorithm, hex) the Hub's ETag promises: sha256 for LFS files, git blob sha1 otherwise."""
    etag = etag.strip('"').removeprefix("W/").strip('"')
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return "sha256", etag
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        return "git-sha1", etag
    return None


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1()
    if algorithm == "git-sha1":
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _describe_http_error(e: Exception, f: HubFile, gated: bool) -> HubError:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    has_token = _token() is not None
    if isinstance(e, GatedRepoError) or (gated and status in (401, 403)):
        how = (
            "your token has no access yet: accept the licence"
            if has_token
            else "no token was given: accept the licence"
        ) + f" at https://huggingface.co/{f.repo}"
        return HubError(
            f"{f.repo} is a gated repository and {how}, then set HF_TOKEN "
            "(or run `hf auth login`) and pull again"
        )
    if isinstance(e, RepositoryNotFoundError) or status in (401, 403):
        return HubError(
            f"{f.repo}/{f.path}: the Hub refused access ({status}): the repository is private, gated "
            "or gone" + ("" if has_token else "; if you have access, set HF_TOKEN and pull again")
        )
    if isinstance(e, HfHubHTTPError):
        return HubError(f"{f.repo}/{f.path}: the Hub answered {status} ({str(e).splitlines()[0]})")
    return HubError(f"{f.repo}/{f.path}: download failed ({type(e).__name__}: {e})")


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _fetch(f: HubFile, staging: Path, endpoint: str | None, attempts: int = 2) -> Path:
    """Download one file into `staging`, resuming a partial one; returns the verified file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(f.repo, f.path, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, endpoint=endpoint)
    except Exception as e:  # noqa: BLE001 - every hub/network failure becomes one clear message
        raise _describe_http_error(e, f, f.repo in GATED_REPOS) from None
    digest = _expected_digest(meta.etag or "")
    if digest is None:
        raise HubError(
            f"{f.repo}/{f.path}: the Hub gave no checksum (ETag {meta.etag!r}); refusing an unverifiable file"
        )
    algorithm, expected = digest
    part = staging / f"{expected}.part"
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN link must not receive the token
    for attempt in range(1, attempts + 1):
        if meta.size is not None and part.exists() and part.stat().st_size > meta.size:
            part.unlink()
        try:
            with part.open("ab") as out:
                http_get(
                    meta.location,
                    out,
                    resume_size=out.tell(),
                    headers=headers,
                    expected_size=meta.size,
                    displayed_filename=Path(f.path).name,
                )
        except HfHubHTTPError as e:
            raise _describe_http_error(e, f, f.repo in GATED_REPOS) from None
        except Exception as e:  # noqa: BLE001 - network failures: the partial file stays for the next pull
            raise HubError(
                f"{f.repo}/{f.path}: download interrupted ({type(e).__name__}: {e}); "
                "run the same pull again to resume it"
            ) from None
        actual = file_digest(part, algorithm)
        if actual == expected:
            return part
        part.unlink()
        if attempt == attempts:
            raise HubError(
                f"{f.repo}/{f.path}: checksum mismatch after {attempts} downloads "
                f"({algorithm} {actual[:12]}… instead of {expected[:12]}…); nothing was installed"
            )
        print(f"{f.path}: checksum mismatch, downloading it again", flush=True)
    raise AssertionError("unreachable")


def pull(name: str, models_dir: Path, endpoint: str | None = None) -> list[Path]:
    """Fetch every missing file of `name` into `models_dir`; returns the installed paths."""
    from tessera.convert import ConvertError, convert

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    staging = models_dir / ".downloads"
    staging.mkdir(parents=True, exist_ok=True)
    installed = []
    for f in files_of(name):
        target = models_dir / f.target
        if target.is_file():
            print(f"{f.target}: already there", flush=True)
            installed.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = _fetch(f, staging, endpoint)
        if f.needs_convert:
            pickle_path = staging / Path(f.path).name
            os.replace(part, pickle_path)
            try:
                summary = convert(pickle_path, target)
            except ConvertError as e:
                os.replace(pickle_path, part)  # kept, verified: the next pull need not fetch it again
                raise HubError(f"{f.repo}/{f.path}: downloaded but not convertible: {e}") from None
            pickle_path.unlink()
            print(
                f"{f.target}: converted from {f.path} ({summary['family'] or 'unrecognised family'})",
                flush=True,
            )
        else:
            os.replace(part, target)
            print(f"{f.target}: verified and installed", flush=True)
        installed.append(target)
    return installed


def main(args) -> int:
    """`tessera models list` / `tessera models pull NAME` (arguments parsed in tessera.cli)."""
    if args.action == "list":
        print("\n".join(list_lines(args.models_dir)))
        print(
            "\npull one with: tessera models pull NAME   (files go into "
            f"{args.models_dir}; set HF_TOKEN for gated repositories)"
        )
        return 0
    try:
        pull(args.name, args.models_dir)
    except HubError as e:
        raise SystemExit(f"tessera models pull {args.name}: {e}") from None
    return 0
