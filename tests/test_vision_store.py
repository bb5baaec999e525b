"""Vision models in the store: a projector GGUF (a tiny random one, tests/projectors.py) kept as
its own layer, told from the model by its metadata; made with /api/create's two files, a
Modelfile's two FROM lines or `xllm serve --mmproj`; pulled beside the model from the Hub and
kept from the registry; refused with both sizes when it does not fit the model; described with
the `vision` capability and its `projector_info`; counted in the memory plan.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from filecmp import cmp
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import ollama
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.projectors import write_projector
from tests.upstream import Upstream
from xllm.cli import main as cli
from xllm.cli.models import show_text
from xllm.config import Settings
from xllm.errors import InvalidRequest, RegistryError
from xllm.memory import planner
from xllm.models import modelfile, projector
from xllm.models import pull as pulling
from xllm.models import store as st
from xllm.models.names import parse_name
from xllm.models.store import Store
from xllm.server.app import create_app, make_registry
from xllm.server.state import REGISTRY

MISMATCH = "the projector makes embeddings of size 32, but the model's embedding size is 16"


@pytest.fixture(scope="module")
def fitting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A projector for tinycoder (embedding size 16)."""
    return write_projector(tmp_path_factory.mktemp("p") / "mmproj-tiny.gguf", 16)


@pytest.fixture(scope="module")
def wrong(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_projector(tmp_path_factory.mktemp("p") / "mmproj-other.gguf", 32, seed=1)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    settings = Settings(models_dir=tmp_path / "models")
    async with TestClient(TestServer(create_app(settings, make_registry(settings)))) as c:
        yield c


def _ollama(client: TestClient[Any, Any]) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=str(client.make_url("")).rstrip("/"))


def _store(client: TestClient[Any, Any]) -> Store:
    s = client.app[REGISTRY].store
    assert s is not None
    return s


async def test_create_with_two_files_keeps_the_projector_as_its_own_layer(
    client: TestClient[Any, Any], tiny_path: Path, fitting: Path
) -> None:
    c = _ollama(client)
    model, proj = await c.create_blob(tiny_path), await c.create_blob(fitting)
    # named to mislead: the projector is told by what the file holds
    await c.create(model="vis", files={"vision.gguf": proj, "weights.gguf": model})
    stored = _store(client).get(parse_name("vis"))
    assert stored is not None
    media = {x.digest: x.media_type for x in stored.manifest.layers}
    assert media[model] == st.MODEL and media[proj] == st.PROJECTOR
    assert cmp(stored.model_path, tiny_path, shallow=False)
    assert stored.projector_path is not None
    assert cmp(stored.projector_path, fitting, shallow=False)

    assert "vision" in ((await c.show("vis")).capabilities or [])
    shown = await (await client.post("/api/show", json={"model": "vis"})).json()
    info = shown["projector_info"]
    assert info["general.architecture"] == "clip" and info["clip.projector_type"] == "mlp"
    assert info["clip.vision.projection_dim"] == 16
    assert info["general.parameter_count"] > 0
    assert f"FROM {stored.projector_path}" in shown["modelfile"]
    text = show_text(shown, verbose=False)
    assert "  Projector\n    architecture" in text and "dimensions          16" in text
    r = await client.get("/v1/models/vis")
    assert "vision" in (await r.json())["capabilities"]

    await c.create(model="text", files={"tiny.gguf": model})
    text_model = await (await client.post("/api/show", json={"model": "text"})).json()
    assert "vision" not in text_model["capabilities"] and "projector_info" not in text_model


async def test_a_projector_joins_a_named_model_by_files_or_a_second_from(
    client: TestClient[Any, Any], tiny_path: Path, fitting: Path
) -> None:
    c = _ollama(client)
    model, proj = await c.create_blob(tiny_path), await c.create_blob(fitting)
    await c.create(model="text", files={"tiny.gguf": model})
    await c.create(model="vis", from_="text", files={"mmproj.gguf": proj})
    assert "vision" in ((await c.show("vis")).capabilities or [])
    # an older client's Modelfile text, the projector uploaded and named by digest
    r = await client.post(
        "/api/create",
        json={"model": "vis-legacy", "stream": False,
              "modelfile": f"FROM text\nFROM @{proj}\nPARAMETER temperature 0.1\n"},
    )  # fmt: skip
    assert r.status == 200, await r.text()
    shown = await c.show("vis-legacy")
    assert "vision" in (shown.capabilities or []) and "temperature" in (shown.parameters or "")
    with pytest.raises(ollama.ResponseError, match="only a vision projector was given"):
        await c.create(model="nothing", files={"mmproj.gguf": proj})


async def test_a_projector_of_another_size_is_refused_at_create(
    client: TestClient[Any, Any], tiny_path: Path, wrong: Path
) -> None:
    c = _ollama(client)
    model, proj = await c.create_blob(tiny_path), await c.create_blob(wrong)
    with pytest.raises(ollama.ResponseError) as e:
        await c.create(model="vis", files={"tiny.gguf": model, "mmproj.gguf": proj})
    assert e.value.status_code == 400 and MISMATCH in e.value.error
    assert _store(client).get(parse_name("vis")) is None
    assert not _store(client).has_blob(proj)  # an uploaded file no model uses is not kept
    await c.create(model="text", files={"tiny.gguf": model})
    proj = await c.create_blob(wrong)
    with pytest.raises(ollama.ResponseError, match=MISMATCH):
        await c.create(model="vis", from_="text", files={"mmproj.gguf": proj})
    proj = await c.create_blob(wrong)
    two = await c.create_blob(write_projector(wrong.with_name("again.gguf"), 16, seed=2))
    with pytest.raises(ollama.ResponseError, match="are both vision projectors"):
        await c.create(model="vis", files={"a.gguf": model, "b.gguf": proj, "c.gguf": two})


def test_a_modelfile_reads_and_writes_a_second_from() -> None:
    mf = modelfile.parse("FROM ./gemma-3-4b.gguf\nFROM ./mmproj-gemma.gguf\nSYSTEM hi\n")
    assert mf.from_ == "./gemma-3-4b.gguf" and mf.also_from == ("./mmproj-gemma.gguf",)
    assert modelfile.parse(modelfile.to_text(mf)) == mf


async def test_xllm_create_uploads_both_from_files(
    client: TestClient[Any, Any],
    tiny_path: Path,
    fitting: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copy(tiny_path, tmp_path / "model.gguf")
    shutil.copy(fitting, tmp_path / "second.gguf")
    (tmp_path / "Modelfile").write_text("FROM ./model.gguf\nFROM ./second.gguf\n")
    monkeypatch.setenv("XLLM_HOST", f"127.0.0.1:{client.port}")
    code = await asyncio.to_thread(cli.main, ["create", "vis", "-f", str(tmp_path / "Modelfile")])
    assert code == 0
    stored = _store(client).get(parse_name("vis"))
    assert stored is not None and stored.projector_path is not None
    assert cmp(stored.projector_path, fitting, shallow=False)


def test_serve_mmproj_pairs_a_projector_with_its_model_file(
    tmp_path: Path, tiny_path: Path, fitting: Path, wrong: Path
) -> None:
    registry = make_registry(Settings(models_dir=tmp_path / "models"))
    name = registry.add_path(tiny_path, fitting)
    facts = registry.facts(registry.find(name))
    assert "vision" in facts.capabilities and facts.projector_info["clip.vision.image_size"] == 32
    with pytest.raises(InvalidRequest, match=MISMATCH):
        registry.add_path(tiny_path, wrong)
    with pytest.raises(InvalidRequest, match="is not a vision projector"):
        registry.add_path(tiny_path, tiny_path)
    r = subprocess.run(
        [sys.executable, "-m", "xllm", "serve", "--model", str(tiny_path), "--mmproj", str(wrong)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and MISMATCH in r.stderr, r.stderr


async def test_the_memory_plan_counts_the_projector(
    tmp_path: Path, tiny_path: Path, fitting: Path
) -> None:
    text = make_registry(Settings(models_dir=tmp_path / "models"))
    name = text.add_path(tiny_path)
    plain = await text.prepare(name, name, ctx_size=256, engine=None)
    vision = make_registry(Settings(models_dir=tmp_path / "models"))
    vision.add_path(tiny_path, fitting)
    spec = await vision.prepare(name, name, ctx_size=256, engine=None)
    assert spec.projector is not None and spec.projector.samefile(fitting)
    assert plain.plan is not None and spec.plan is not None
    p = projector.read(fitting)
    assert spec.plan.weights - plain.plan.weights == p.weights > 0
    assert spec.plan.compute - plain.plan.compute == p.compute
    # 4 bytes x (the 32 x 32 input image x 3 + 2 x 16 patches x 48, the widest activations)
    assert p.compute == 4 * (3 * 32 * 32 + 2 * 16 * 48)
    both = planner.with_projector(
        planner.Plan(1, 2, 3, 4, layers=2, gpu_layers=3, vram=10), p.weights, p.compute
    )
    assert both.vram == 10 + p.weights + p.compute


# --- pulls ------------------------------------------------------------------------------------


@pytest.fixture
def upstream(tiny_path: Path, fitting: Path, wrong: Path) -> Iterator[Upstream]:
    tiny = tiny_path.read_bytes()
    u = Upstream()
    u.add_model("vis", tiny, extra=[(st.PROJECTOR, fitting.read_bytes())])
    u.add_hf_repo(
        "org/Vis-GGUF",
        {
            "vis-Q4_K_M.gguf": tiny,
            "mmproj-vis-F32.gguf": write_projector(
                wrong.with_name("f32.gguf"), 16, seed=3
            ).read_bytes(),
            "mmproj-vis-F16.gguf": fitting.read_bytes(),
        },
    )
    u.add_hf_repo("org/Wrong-GGUF", {"w-Q4_K_M.gguf": tiny, "mmproj-w.gguf": wrong.read_bytes()})
    u.start()
    yield u
    u.stop()


async def _pull(store: Store, upstream: Upstream, name: str) -> None:
    settings = Settings(registry=upstream.url, hf_endpoint=upstream.url)
    async for _ in pulling.pull(store, settings, parse_name(name)):
        pass


async def test_a_registry_pull_keeps_the_projector_layer(
    tmp_path: Path, upstream: Upstream, fitting: Path
) -> None:
    store = Store(tmp_path / "models")
    await _pull(store, upstream, "vis")
    model = store.get(parse_name("vis"))
    assert model is not None and model.projector_path is not None
    assert cmp(model.projector_path, fitting, shallow=False)
    assert upstream.hits[model.manifest.all(st.PROJECTOR)[0].digest] == 1


async def test_a_hub_pull_fetches_the_mmproj_beside_the_quant(
    tmp_path: Path, upstream: Upstream, fitting: Path
) -> None:
    store = Store(tmp_path / "models")
    await _pull(store, upstream, "hf.co/org/Vis-GGUF")
    model = store.get(parse_name("hf.co/org/Vis-GGUF:latest"))
    assert model is not None and model.projector_path is not None
    assert cmp(model.projector_path, fitting, shallow=False)  # F16 before F32
    config = json.loads(store.blob_path(model.manifest.config.digest).read_text())
    assert config["source"]["projector"] == "mmproj-vis-F16.gguf"
    with pytest.raises(RegistryError, match=MISMATCH):
        await _pull(store, upstream, "hf.co/org/Wrong-GGUF")
    assert [m.name.display for m in store.list()] == ["hf.co/org/Vis-GGUF:latest"]


@pytest.mark.parametrize(
    ("tensor", "shape"),
    [("mm.2.weight", (16, 32)), ("mm.input_projection.weight", (32, 16))],  # mlp, gemma3
)
def test_a_projector_without_projection_dim_is_sized_by_its_last_tensor(
    tmp_path: Path, tensor: str, shape: tuple[int, int]
) -> None:
    """Older converters wrote no `clip.vision.projection_dim`: the output size is then the
    last projection's (numpy shapes are ggml's dimensions reversed)."""
    path = tmp_path / "old.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_tensor(tensor, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    found = projector.read(path)
    assert found.embedding_length == 16
    projector.check_fits(found, 16, "x", "files")
    with pytest.raises(InvalidRequest, match=r"makes embeddings of size 16, but the model's .* 32"):
        projector.check_fits(found, 32, "x", "files")


def test_gemma3_projector_fits_by_its_declared_size(tmp_path: Path) -> None:
    path = write_projector(tmp_path / "g.gguf", 640, kind="gemma3")
    assert projector.read(path).embedding_length == 640
