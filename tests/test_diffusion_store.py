"""Diffusion models in the store, with the real files of the tests' tiny FLUX.2-klein-style
model: told apart from other formats by their part names, described without loading
(architecture as stable-diffusion.cpp names it, parameters, parts), created from uploaded parts
(all GGUF, which must not be taken for a split text model), listed, shown, copied and removed;
parts that do not make a model are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.diffusion_models import write_tiny_flux2
from tests.upstream import Upstream, sha
from xllm.config import Settings
from xllm.engine.llamacpp_archs import ARCHITECTURES
from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines
from xllm.engine.registry import ModelRegistry
from xllm.errors import InvalidRequest, XllmError
from xllm.models import create, diffusion, folders, gguf, summary
from xllm.models import pull as pulling
from xllm.models import store as st
from xllm.models.names import parse_name
from xllm.models.store import Store
from xllm.server.app import create_app, make_registry


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_flux2(tmp_path_factory.mktemp("diffusion") / "tiny-flux")


def test_a_folder_of_parts_is_a_diffusion_model(tiny_flux: Path) -> None:
    facts = summary.of_file(tiny_flux)
    assert facts.format == "diffusion" and facts.architecture == "Flux.2 klein"
    assert facts.capabilities == ["image_generation"] and facts.quantization == "F16"
    info = facts.model_info
    assert info["diffusion.parts"] == ["diffusion_model", "llm", "taesd"]
    parts = ("diffusion_model", "llm", "taesd")
    assert facts.parameter_count == sum(info[f"diffusion.{p}.parameter_count"] for p in parts)
    assert 151_936 * 64 < info["diffusion.llm.parameter_count"] < 151_936 * 64 + 10**6
    assert folders.size(tiny_flux) == sum(p.stat().st_size for p in tiny_flux.iterdir())


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
         "SD 1.x"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
         "SD 2.x"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
          "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}, "SDXL"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (1, 1)}, "SD3.x"),
        ({"double_blocks.0.img_attn.qkv.weight": (1, 1)}, "Flux"),
        ({"double_stream_modulation_img.lin.weight": (1, 1),
          "single_blocks.47.linear1.weight": (1, 1)}, "Flux.2"),
        ({"double_stream_modulation_img.lin.weight": (1, 1)}, "Flux.2 klein"),
        ({"cap_embedder.0.weight": (1, 1)}, "Z-Image"),
        ({"transformer_blocks.0.img_mod.1.weight": (1, 1)}, "Qwen Image"),
        ({"something.else": (1,)}, "unknown"),
    ],
)  # fmt: skip
def test_the_architecture_is_stable_diffusion_cpp_s_name(
    names: dict[str, tuple[int, ...]], expected: str
) -> None:
    assert diffusion.architecture(names) == expected


@pytest.mark.parametrize(
    ("names", "whole"),
    [
        ({"diffusion_model.gguf", "llm.gguf", "vae.safetensors"}, True),
        ({"model.safetensors"}, True),
        ({"llm.gguf", "vae.gguf"}, False),
        ({"diffusion_model.gguf", "diffusion_model.safetensors"}, False),
        ({"diffusion_model.gguf", "../vae.gguf"}, False),
        ({"diffusion_model.gguf", "notes.txt"}, False),
    ],
)
def test_which_names_make_a_model(names: set[str], whole: bool) -> None:
    assert diffusion.complete(names) is whole


def test_a_hugging_face_folder_is_not_taken_for_one() -> None:
    assert folders.detect({"config.json", "model.safetensors"}) == folders.FORMATS["safetensors"]
    assert folders.detect({"model.safetensors", "vae.safetensors"}) == folders.FORMATS["diffusion"]


async def test_create_show_list_copy_and_remove(tiny_flux: Path, tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path / "models", images_dir=tmp_path / "images")
    registry = make_registry(settings)
    s = registry.store
    assert s is not None
    parts = sorted(tiny_flux.iterdir())  # noqa: ASYNC240 (a test's few small files)
    size = sum(p.stat().st_size for p in parts)
    digests = {p.name: await s.add_file(p) for p in parts}
    records = await create.create(registry, create.Recipe(parse_name("flux"), files=digests))
    assert records[-1] == "success"
    model = s.get(parse_name("flux"))
    assert model is not None and model.format == "diffusion"
    assert dict(model.named_files) == digests
    async with TestClient(TestServer(create_app(settings, registry))) as client:
        tags = (await (await client.get("/api/tags")).json())["models"]
        entry = next(m for m in tags if m["name"] == "flux:latest")
        assert entry["details"]["format"] == "diffusion"
        assert entry["details"]["family"] == "Flux.2 klein"
        assert size < entry["size"] < size + 4096  # the parts and the config blob naming them
        show = await (await client.post("/api/show", json={"model": "flux"})).json()
        assert show["capabilities"] == ["image_generation"]
        assert show["model_info"]["diffusion.parts"] == ["diffusion_model", "llm", "taesd"]
        models = (await (await client.get("/v1/models")).json())["data"]
        assert next(m for m in models if m["id"] == "flux:latest")["capabilities"] == [
            "image_generation"
        ]
        r = await client.post("/api/copy", json={"source": "flux", "destination": "flux2"})
        assert r.status == 200
        r = await client.request("DELETE", "/api/delete", json={"model": "flux"})
        assert r.status == 200
        assert s.get(parse_name("flux")) is None and s.get(parse_name("flux2")) is not None
    folder = await asyncio.to_thread(s.model_dir, s.get(parse_name("flux2")))  # type: ignore[arg-type]
    assert sorted(p.name for p in folder.iterdir()) == sorted(digests)


async def test_parts_that_make_no_model_are_refused(tiny_flux: Path, tmp_path: Path) -> None:
    s = Store(tmp_path / "models")
    registry = ModelRegistry(EngineOptions(), store=s, engines=Engines())
    llm = await s.add_file(tiny_flux / "llm.gguf")
    dit = await s.add_file(tiny_flux / "diffusion_model.gguf")
    with pytest.raises(InvalidRequest) as e:  # two diffusion models
        files = {"diffusion_model.gguf": dit, "diffusion_model.safetensors": llm}
        await create.create(registry, create.Recipe(parse_name("bad"), files=files))
    assert e.value.param == "files" and s.get(parse_name("bad")) is None
    junk = await s.add_bytes(b"not a gguf at all, just bytes")
    with pytest.raises(InvalidRequest) as e:
        files = {"diffusion_model.gguf": junk, "llm.gguf": llm}
        await create.create(registry, create.Recipe(parse_name("bad"), files=files))
    assert e.value.param == "files" and "GGUF" in e.value.message
    assert s.get(parse_name("bad")) is None


async def test_an_llm_uploaded_as_model_gguf_is_a_text_model(
    tiny_flux: Path, tiny_path: Path, tmp_path: Path
) -> None:
    # Ollama's clients, and `xllm create` from a folder named `model`, may name a GGUF
    # model.gguf, a diffusion checkpoint's name: what the file holds decides
    s = Store(tmp_path / "models")
    registry = ModelRegistry(EngineOptions(), store=s, engines=Engines())
    llm = await s.add_file(tiny_path)
    await create.create(registry, create.Recipe(parse_name("llm"), files={"model.gguf": llm}))
    stored = s.get(parse_name("llm"))
    assert stored is not None and [x.media_type for x in stored.manifest.layers] == [st.MODEL]
    dit = await s.add_file(tiny_flux / "diffusion_model.gguf")
    await create.create(registry, create.Recipe(parse_name("dit"), files={"model.gguf": dit}))
    stored = s.get(parse_name("dit"))
    assert stored is not None
    assert (
        folders.by_media(x.media_type for x in stored.manifest.layers)
        == folders.FORMATS["diffusion"]
    )


async def test_without_the_images_extra_a_request_is_a_400_naming_it(
    tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xllm.engine import diffusion as engine

    monkeypatch.setattr(engine, "installed", lambda: None)
    settings = Settings(models_dir=tmp_path / "models", images_dir=tmp_path / "images")
    registry = make_registry(settings)
    registry.add_path(tiny_flux)
    async with TestClient(TestServer(create_app(settings, registry))) as client:
        r = await client.post("/v1/images/generations", json={"model": "tiny-flux", "prompt": "x"})
        body = await r.json()
        assert r.status == 400, body
        assert body["error"]["param"] == "model"
        assert "pip install 'xllm[images]'" in body["error"]["message"]
        assert registry.loaded == {}
        health = await (await client.get("/v0/health")).json()
        assert health["status"] == "ok"


async def test_pull_a_hub_repo_of_parts(tiny_flux: Path, tmp_path: Path) -> None:
    parts = {p.name: p.read_bytes() for p in sorted(tiny_flux.iterdir())}  # noqa: ASYNC240
    upstream = Upstream()
    upstream.add_hf_repo("me/tiny-flux", {**parts, "README.md": b"# parts\n",
                                          "extra/vae.gguf": b"not taken"})  # fmt: skip
    upstream.start()
    try:
        s = Store(tmp_path / "models")
        settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
        name = parse_name("hf.co/me/tiny-flux")
        records = [r async for r in pulling.pull(s, settings, name)]
        assert records[-1] == {"status": "success"}
        model = s.get(name)
        assert model is not None and model.format == "diffusion"
        assert dict(model.named_files) == {n: sha(d) for n, d in parts.items()}
        facts = s.summary_of(model.manifest)
        assert (facts.architecture, facts.capabilities) == ("Flux.2 klein", ["image_generation"])
    finally:
        upstream.stop()


async def test_pull_tells_a_hub_model_gguf_by_its_header(
    tiny_flux: Path, tiny_path: Path, tmp_path: Path
) -> None:
    # a repo whose one file is model.gguf (a checkpoint's name): its first bytes decide
    upstream = Upstream()
    llm = tiny_path.read_bytes()  # noqa: ASYNC240
    dit = (tiny_flux / "diffusion_model.gguf").read_bytes()
    upstream.add_hf_repo("me/llm", {"model.gguf": llm, "README.md": b"# a text model\n"})
    upstream.add_hf_repo("me/checkpoint", {"model.gguf": dit})
    upstream.start()
    try:
        s = Store(tmp_path / "models")
        settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
        for repo, fmt in (("me/llm", "gguf"), ("me/checkpoint", "diffusion")):
            name = parse_name(f"hf.co/{repo}")
            records = [r async for r in pulling.pull(s, settings, name)]
            assert records[-1] == {"status": "success"}, repo
            model = s.get(name)
            assert model is not None and model.format == fmt, repo
        text = s.get(parse_name("hf.co/me/llm"))
        assert text is not None and [x.media_type for x in text.manifest.layers][-1] == st.MODEL
    finally:
        upstream.stop()


def test_a_gguf_s_architecture_from_its_first_bytes(tiny_flux: Path, tiny_path: Path) -> None:
    head = tiny_path.read_bytes()[: 1 << 16]
    assert gguf.prefix_architecture(head) == gguf.read(tiny_path).architecture == "llama"
    assert gguf.prefix_architecture(head[:30]) is None  # ends before the key
    assert gguf.prefix_architecture(b"not a gguf at all" * 10) is None
    dit = (tiny_flux / "diffusion_model.gguf").read_bytes()[: 1 << 16]
    assert gguf.prefix_architecture(dit) not in ARCHITECTURES


async def test_pull_files_named_freely_by_part_from_two_repos(
    tiny_flux: Path, tmp_path: Path
) -> None:
    """As a real FLUX.2-klein: the diffusion model and its decoder in one repo under their own
    names, the text encoder from another repo; `parts` maps each to its part."""
    data = {p.name: p.read_bytes() for p in sorted(tiny_flux.iterdir())}  # noqa: ASYNC240
    upstream = Upstream()
    upstream.add_hf_repo("org/flux-2-klein-GGUF", {
        "flux-2-klein-4b-Q4_0.gguf": data["diffusion_model.gguf"],
        "flux-2-klein-4b-Q8_0.gguf": b"another quant, not taken",
        "taef2.gguf": data["taesd.gguf"], "README.md": b"# flux\n"})  # fmt: skip
    upstream.add_hf_repo("other/Qwen3-GGUF", {"Qwen3-4B-Q4_K_M.gguf": data["llm.gguf"]})
    upstream.start()
    try:
        s = Store(tmp_path / "models")
        settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
        name = parse_name("hf.co/org/flux-2-klein-GGUF:q4_0")
        parts = {"diffusion_model": "flux-2-klein-4b-Q4_0.gguf", "taesd": "taef2.gguf",
                 "llm": "hf.co/other/Qwen3-GGUF/Qwen3-4B-Q4_K_M.gguf"}  # fmt: skip
        records = [r async for r in pulling.pull(s, settings, name, parts=parts)]
        assert records[-1] == {"status": "success"}
        model = s.get(name)
        assert model is not None and model.format == "diffusion"
        assert dict(model.named_files) == {n: sha(d) for n, d in data.items()}
        facts = s.summary_of(model.manifest)
        assert facts.architecture == "Flux.2 klein"
        assert facts.model_info["diffusion.parts"] == ["diffusion_model", "llm", "taesd"]

        async def refused(parts: dict[str, str], model: str = "hf.co/org/flux-2-klein-GGUF") -> str:
            with pytest.raises(XllmError) as e:
                async for _ in pulling.pull(s, settings, parse_name(model), parts=parts):
                    pass
            assert e.value.param == "parts" and e.value.message.startswith("parts: ")
            assert e.value.status in (400, 404)
            return e.value.message

        assert "not a part" in await refused({"unet": "flux-2-klein-4b-Q4_0.gguf"})
        assert "needs model" in await refused({"vae": "taef2.gguf"})
        assert "no file 'missing.gguf'" in await refused({"diffusion_model": "missing.gguf"})
        assert "no file" in await refused(
            {
                "diffusion_model": "flux-2-klein-4b-Q4_0.gguf",
                "llm": "hf.co/org/flux-2-klein-GGUF/x.gguf",
            }
        )
        assert ".safetensors" in await refused({"diffusion_model": "README.md"})
        assert "hf.co/<org>/<repo>/<file>" in await refused({"diffusion_model": "hf.co/org/x.gguf"})
        assert "Hugging Face repo" in await refused(
            {"diffusion_model": "a.gguf"}, model="registry.example/lib/flux:latest"
        )
    finally:
        upstream.stop()


async def test_api_pull_validates_parts(tmp_path: Path) -> None:
    settings = Settings(models_dir=tmp_path / "models", images_dir=tmp_path / "images")
    async with TestClient(TestServer(create_app(settings, make_registry(settings)))) as client:
        for parts in ({"diffusion_model": 5}, ["diffusion_model"], {f"p{i}": "f.gguf" for i in range(9)},
                      {"diffusion_model": ""}):  # fmt: skip
            r = await client.post("/api/pull", json={"model": "hf.co/o/r", "parts": parts})
            body = await r.json()
            assert r.status == 400 and "parts" in body["error"], body
        for stream in (True, False):  # refused before the Hub is asked, before any record
            r = await client.post("/api/pull", json={"model": "hf.co/o/r", "stream": stream,
                                                     "parts": {"unet": "u.gguf"}})  # fmt: skip
            body = await r.json()
            assert r.status == 400, body
            assert body["error"].startswith("parts: 'unet' is not a part"), body


def test_the_cli_sends_parts() -> None:
    from xllm.cli.main import build_parser

    args = build_parser().parse_args(
        ["pull", "hf.co/o/r", "--part", "diffusion_model=a.gguf", "--part", "vae=b=c.safetensors"]
    )
    assert dict(args.part) == {"diffusion_model": "a.gguf", "vae": "b=c.safetensors"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pull", "hf.co/o/r", "--part", "vae"])


async def test_api_pull_with_parts_then_show(tiny_flux: Path, tmp_path: Path) -> None:
    data = {p.name: p.read_bytes() for p in sorted(tiny_flux.iterdir())}  # noqa: ASYNC240
    upstream = Upstream()
    upstream.add_hf_repo("org/flux", {"dit-Q4_0.gguf": data["diffusion_model.gguf"],
                                      "qwen.gguf": data["llm.gguf"], "tae.gguf": data["taesd.gguf"]})  # fmt: skip
    upstream.start()
    try:
        settings = Settings(models_dir=tmp_path / "models", images_dir=tmp_path / "images",
                            registry=upstream.url, hf_endpoint=upstream.url)  # fmt: skip
        app = create_app(settings, make_registry(settings))
        async with TestClient(TestServer(app)) as client:
            parts = {"diffusion_model": "dit-Q4_0.gguf", "llm": "qwen.gguf", "taesd": "tae.gguf"}
            r = await client.post("/api/pull", json={"model": "hf.co/org/flux", "stream": False,
                                                     "parts": parts})  # fmt: skip
            assert r.status == 200, await r.text()
            show = await (await client.post("/api/show", json={"model": "hf.co/org/flux"})).json()
            assert show["capabilities"] == ["image_generation"]
            assert show["model_info"]["general.architecture"] == "Flux.2 klein"
            assert show["model_info"]["diffusion.parts"] == ["diffusion_model", "llm", "taesd"]
    finally:
        upstream.stop()
