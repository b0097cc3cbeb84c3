"""`tessera models pull` against a fake Hugging Face Hub on 127.0.0.1 (HF_ENDPOINT): resume, checksums, 401."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

import pytest
import torch
from aiohttp import web
from huggingface_hub import constants
from real_model_fixtures import write_var_pth
from safetensors import safe_open

from tessera import hub
from tessera.cli import main
from tessera.engines.multiscale_vq import load_multiscale_vq
from tessera.engines.var import load_var
from tessera.engines.vq import VQConfig, VQModel

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Serves /{repo}/resolve/{rev}/{path} like the Hub: HEAD metadata, GET with Range, gating, faults."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}
        self.gated: set[str] = set()
        self.token = "hf_test_token"
        self.corrupt: dict[str, int] = {}  # path -> how many GETs still send a flipped byte
        self.drop_after: dict[str, int] = {}  # path -> the next GET closes the connection after N bytes
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['name']}"
        path = request.match_info["path"]
        self.log.append((request.method, path, request.headers.get("Range")))
        if repo in self.gated and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        data = self.files.get((repo, path))
        if data is None:
            return web.Response(
                status=404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
            )
        if path.endswith(".json"):  # small files are plain git blobs: their ETag is the git sha1
            sha = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "Content-Length": str(len(data))}
        else:  # LFS files: the ETag is the sha256 of the content
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{sha}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "Accept-Ranges": "bytes",
            }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        if self.corrupt.get(path, 0) > 0:
            self.corrupt[path] -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status = 0, 200
        if request.headers.get("Range"):
            start = int(request.headers["Range"].removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers.pop("Content-Length", None)
        response = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        cut = self.drop_after.pop(path, None)
        if cut is not None:
            await response.write(body[:cut])
            await asyncio.sleep(0.05)
            request.transport.close()  # the connection dies mid-file
            return response
        await response.write(body)
        await response.write_eof()
        return response


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    fake = FakeHub()
    app = web.Application()
    app.router.add_route("*", "/{owner}/{name}/resolve/{rev}/{path:.*}", fake.handle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(hub, "_token", lambda: None)
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import: a flag set by the caller's environment
    # must not turn these downloads into OfflineModeIsEnabled errors, so it is off for this test only.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def catalogue(monkeypatch, *entries: hub.CatalogueEntry) -> None:
    monkeypatch.setattr(hub, "CATALOGUE", {e.name: e for e in entries})
    monkeypatch.setattr(hub, "GATED_REPOS", {f.repo for e in entries if e.gated for f in e.files})


def blob(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()


def test_interrupted_download_resumes_within_the_run_and_from_a_previous_run(fake_hub, monkeypatch, tmp_path):
    chunk = constants.DOWNLOAD_CHUNK_SIZE  # huggingface_hub writes whole chunks: cut past the first one
    data, other = blob(2 * chunk + 123), blob(200_000, seed=1)
    fake_hub.files[("org/weights", "big.safetensors")] = data
    fake_hub.files[("org/weights", "other.safetensors")] = other
    catalogue(
        monkeypatch,
        hub.CatalogueEntry(
            "big",
            "test",
            (
                hub.HubFile("org/weights", "big.safetensors", "diffusion_models/big.safetensors", len(data)),
                hub.HubFile("org/weights", "other.safetensors", "vae/other.safetensors", len(other)),
            ),
        ),
    )
    # This run: the connection dies after one chunk and a bit; huggingface_hub resumes with a Range request.
    fake_hub.drop_after["big.safetensors"] = chunk + 1000
    # A previous run was killed after 50 kB of the other file: its partial file is picked up.
    staging = tmp_path / "models" / ".downloads"
    staging.mkdir(parents=True)
    (staging / f"{hashlib.sha256(other).hexdigest()}.part").write_bytes(other[:50_000])

    hub.pull("big", tmp_path / "models")
    assert (tmp_path / "models/diffusion_models/big.safetensors").read_bytes() == data
    assert (tmp_path / "models/vae/other.safetensors").read_bytes() == other
    gets = [(p, r) for m, p, r in fake_hub.log if m == "GET"]
    assert gets[0] == ("big.safetensors", None)
    assert gets[1] == ("big.safetensors", f"bytes={chunk}-")
    assert gets[2] == ("other.safetensors", "bytes=50000-")
    assert not list(staging.iterdir())  # nothing left behind
    hub.pull("big", tmp_path / "models")  # a second pull fetches nothing
    assert len([1 for m, *_ in fake_hub.log if m == "GET"]) == 3


def test_corrupt_file_is_retried_then_refused(fake_hub, monkeypatch, tmp_path):
    data = blob(4096)
    fake_hub.files[("org/w", "a.safetensors")] = data
    catalogue(
        monkeypatch,
        hub.CatalogueEntry("a", "test", (hub.HubFile("org/w", "a.safetensors", "vae/a.safetensors", 1),)),
    )
    fake_hub.corrupt["a.safetensors"] = 1  # one bad transfer: downloaded again, then fine
    hub.pull("a", tmp_path / "m")
    assert (tmp_path / "m/vae/a.safetensors").read_bytes() == data
    fake_hub.corrupt["a.safetensors"] = 5  # always bad: refused, nothing installed
    (tmp_path / "m/vae/a.safetensors").unlink()
    with pytest.raises(
        hub.HubError, match=r"a\.safetensors: checksum mismatch after 2 downloads.*nothing was installed"
    ):
        hub.pull("a", tmp_path / "m")
    assert not (tmp_path / "m/vae/a.safetensors").exists()
    assert not list((tmp_path / "m/.downloads").iterdir())


def test_gated_repo_without_token_is_a_clear_401_message_and_a_token_opens_it(
    fake_hub, monkeypatch, tmp_path, capsys
):
    fake_hub.files[("lab/gated", "w.safetensors")] = blob(1000)
    fake_hub.gated.add("lab/gated")
    catalogue(
        monkeypatch,
        hub.CatalogueEntry(
            "g", "test", (hub.HubFile("lab/gated", "w.safetensors", "vae/w.safetensors", 1),), gated=True
        ),
    )
    with pytest.raises(SystemExit) as err:
        main(["models", "pull", "g", "--models-dir", str(tmp_path)])
    message = str(err.value)
    assert "lab/gated is a gated repository" in message and "no token was given" in message
    assert "https://huggingface.co/lab/gated" in message and "HF_TOKEN" in message
    assert not (tmp_path / "vae/w.safetensors").exists()
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    assert main(["models", "pull", "g", "--models-dir", str(tmp_path)]) == 0
    assert (tmp_path / "vae/w.safetensors").read_bytes() == fake_hub.files[("lab/gated", "w.safetensors")]


def test_plain_401_and_missing_file_name_the_file(fake_hub, monkeypatch, tmp_path):
    fake_hub.gated.add("lab/private")  # not marked gated in the catalogue: a private repository
    catalogue(
        monkeypatch,
        hub.CatalogueEntry("p", "t", (hub.HubFile("lab/private", "x.safetensors", "vae/x.safetensors", 1),)),
        hub.CatalogueEntry(
            "m", "t", (hub.HubFile("lab/open", "gone.safetensors", "vae/gone.safetensors", 1),)
        ),
    )
    with pytest.raises(hub.HubError, match="lab/private"):
        hub.pull("p", tmp_path)
    with pytest.raises(hub.HubError, match=r"lab/open/gone\.safetensors: the Hub answered 404"):
        hub.pull("m", tmp_path)
    with pytest.raises(hub.HubError, match="no model 'nope' in the catalogue"):
        hub.pull("nope", tmp_path)


def test_llamagen_pickle_is_pulled_then_converted(fake_hub, monkeypatch, tmp_path):
    torch.manual_seed(0)
    vq = VQModel(
        VQConfig(
            channels=32,
            ch_mult=[1, 2],
            decoder_ch_mult=[1, 2],
            num_res_blocks=1,
            z_channels=4,
            codebook_size=16,
            codebook_dim=4,
        )
    )
    torch.save({"model": vq.state_dict(), "steps": 10}, tmp_path / "vq.pt")
    fake_hub.files[("FoundationVision/LlamaGen", "vq_ds16_c2i.pt")] = (tmp_path / "vq.pt").read_bytes()
    real = hub.CATALOGUE["llamagen-vq-c2i"]
    catalogue(monkeypatch, real)
    hub.pull("llamagen-vq-c2i", tmp_path / "models")
    out = tmp_path / "models" / real.files[0].target
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["tessera.family"] == "VQ tokenizer"
        torch.testing.assert_close(
            f.get_tensor("quantize.embedding.weight"), vq.state_dict()["quantize.embedding.weight"]
        )
    assert not list((tmp_path / "models/.downloads").iterdir())


def test_var_pickles_are_pulled_converted_and_load(fake_hub, monkeypatch, tmp_path):
    """`models pull var-d16` fetches VAR's two pickles and converts both; the results load by shape."""
    vae_pth, var_pth = write_var_pth(tmp_path / "published")
    fake_hub.files[("FoundationVision/var", "vae_ch160v4096z32.pth")] = vae_pth.read_bytes()
    fake_hub.files[("FoundationVision/var", "var_d16.pth")] = var_pth.read_bytes()  # a tiny depth-2 stand-in
    catalogue(monkeypatch, hub.CATALOGUE["var-vq"], hub.CATALOGUE["var-d16"])
    hub.pull("var-d16", tmp_path / "models")
    model = load_var(tmp_path / "models/ar_models/var_d16.safetensors")
    vq = load_multiscale_vq(tmp_path / "models/vq_models/var_vae_ch160v4096z32.safetensors")
    assert model.config.depth == 2 and vq.config.patch_nums == model.config.patch_nums
    assert not list((tmp_path / "models/.downloads").iterdir())


def test_catalogue_covers_the_issue_and_lists_install_state(tmp_path):
    names = set(hub.CATALOGUE)
    assert {
        "flux1-schnell",
        "flux1-dev",
        "flux-vae",
        "clip-l",
        "t5xxl-fp16",
        "t5xxl-fp8",
        "llamagen-c2i",
        "llamagen-t2i",
        "flan-t5-xl",
    } <= names
    targets = {f.target.split("/")[0] for n in names for f in hub.files_of(n)}
    assert targets <= {"diffusion_models", "vae", "text_encoders", "vq_models", "ar_models", "tokenizers"}
    assert all(
        f.target.endswith(".safetensors") for n in names for f in hub.files_of(n) if f.path.endswith(".pt")
    )
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae/ae.safetensors").write_bytes(b"x")
    lines = dict(line.split(maxsplit=1) for line in hub.list_lines(tmp_path))
    assert "installed" in lines["flux-vae"] and "1/7 files" in lines["flux1-schnell"]
    assert "gated" in lines["flux1-dev"] and "gated" in lines["flux1-schnell"]  # BFL asks users to accept
    assert "gated" not in lines["llamagen-t2i"] and "gated" not in lines["t5xxl-fp8"]


def test_small_files_are_checked_against_their_git_sha1(fake_hub, monkeypatch, tmp_path):
    config = b'{"d_model": 2048}'
    fake_hub.files[("org/enc", "config.json")] = config
    catalogue(
        monkeypatch,
        hub.CatalogueEntry(
            "c", "t", (hub.HubFile("org/enc", "config.json", "text_encoders/enc/config.json", 1),)
        ),
    )
    fake_hub.corrupt["config.json"] = 1
    hub.pull("c", tmp_path)
    assert (tmp_path / "text_encoders/enc/config.json").read_bytes() == config
    assert [m for m, p, _ in fake_hub.log if m == "GET"] == ["GET", "GET"]  # the corrupt copy was refused
