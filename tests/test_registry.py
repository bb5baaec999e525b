"""The registry's side of a load, over the fake engine plugin: what a load takes (engine, files,
options under the Modelfile and the request), errors before anything loads, failures kept for
`/v0/health`, and loading through its scheduler. The scheduler's own decisions are in
test_scheduler.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests import fake_engine, gguf_corpus, gguf_make
from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines, LoadSpec
from xllm.engine.registry import ModelRegistry, _with_modelfile
from xllm.errors import InvalidRequest, ModelLoadError, ModelNotFound
from xllm.models.modelfile import Modelfile


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return fake_engine.model_folder(tmp_path / "fake")


def _registry(engines: Engines | None = None, ctx_size: int = 1024) -> ModelRegistry:
    return ModelRegistry(EngineOptions(ctx_size=ctx_size), engines=engines or fake_engine.engines())


async def test_what_a_load_takes(folder: Path) -> None:
    reg = _registry()
    name = reg.add_path(folder)
    where = folder.resolve()  # noqa: ASYNC240
    spec = await reg.prepare(name, f"{name}#2", ctx_size=None, engine=None)
    assert (spec.name, spec.key, spec.engine) == (name, f"{name}#2", "fake")
    assert (spec.format, spec.architecture) == ("safetensors", "FakeLM")
    assert spec.path == where and spec.files == (where,)
    assert spec.options.ctx_size == 1024 and spec.plan is not None  # the engine's estimate
    spec = await reg.prepare(name, name, ctx_size=512, engine="fake")
    assert spec.options.ctx_size == 512  # the request's context over the server's


async def test_loads_through_the_scheduler(folder: Path) -> None:
    reg = _registry()
    name = reg.add_path(folder)
    model = await reg.get(name, keep_alive=-1)
    assert isinstance(model, fake_engine.FakeEngine)
    assert reg.loaded == {name: model} and model.keep_alive == -1
    assert name in reg.available()
    assert await reg.unload(name) is True and reg.loaded == {}
    await reg.close()


async def test_refused_before_anything_loads(folder: Path) -> None:
    reg = _registry()
    name = reg.add_path(folder)
    with pytest.raises(ModelNotFound):
        await reg.get("nothing-of-that-name")
    with pytest.raises(InvalidRequest, match="no engine named 'vllm'") as e:
        await reg.get(name, engine="vllm")
    assert e.value.param == "engine"
    assert reg.loaded == {} and reg.loading() == [] and reg.engines.failures == {}


async def test_a_failed_load_is_the_engine_state_until_one_succeeds(folder: Path) -> None:
    broken = True

    async def load(spec: LoadSpec) -> fake_engine.FakeEngine:
        if broken:
            raise ModelLoadError("the fake engine could not load it")
        return fake_engine.FakeEngine(spec)

    reg = _registry(Engines([dataclasses.replace(fake_engine.MANIFEST, load=load)]))
    name = reg.add_path(folder)
    with pytest.raises(ModelLoadError):
        await reg.get(name)
    assert reg.engines.failures == {"fake": "the fake engine could not load it"}
    assert reg.engines.states([], [])[0]["state"] == "error"
    broken = False
    await reg.get(name)
    assert reg.engines.failures == {}
    await reg.close()


def test_the_modelfile_at_load() -> None:
    go = "{{ if .System }}{{ .System }}{{ end }}{{ .Prompt }}"
    o = _with_modelfile(EngineOptions(ctx_size=4096), "m", Modelfile(parameters={"num_ctx": 2048}))
    assert o.ctx_size == 2048 and o.chat_template is None
    o = _with_modelfile(EngineOptions(), "m", Modelfile(template=go))
    assert o.chat_template is not None and "{{" in o.chat_template
    assert o.chat_template != go  # Go's syntax translated to Jinja2
    broken = _with_modelfile(EngineOptions(), "m", Modelfile(template="{{ .Prompt"))
    assert broken.chat_template is None  # the model's own template is used


async def test_a_draft_model_comes_from_the_config_the_modelfile_or_the_server(
    tmp_path: Path,
) -> None:
    files = {n: tmp_path / f"{n}.gguf" for n in ("server", "modelfile", "config")}
    for f in files.values():
        gguf_corpus.write(f)
    options = EngineOptions(draft_model=str(files["server"]))
    reg = ModelRegistry(options, drafts={"big": str(files["config"])})
    plain = Modelfile()
    drafted = Modelfile(parameters={"draft_model": str(files["modelfile"])})

    async def draft(name: str, modelfile: Modelfile, default_mode: bool = True) -> EngineOptions:
        return await reg._with_draft(name, modelfile, options, default_mode)

    o = await draft("other", plain)
    assert (o.draft_model, o.draft_path) == ("server:latest", str(files["server"].resolve()))
    assert o.speculative == "draft"  # a model with a draft drafts unless told otherwise
    assert (await draft("other", drafted)).draft_model == "modelfile:latest"
    assert (await draft("big", drafted)).draft_model == "config:latest"
    assert (await draft("other", plain, default_mode=False)).speculative == "none"
    bare = ModelRegistry(EngineOptions())
    o = await bare._with_draft("m", plain, EngineOptions(), True)
    assert (o.draft_model, o.draft_path, o.speculative) == (None, None, "none")
    # a split draft: named by its first file, it brings the others in order
    shards = gguf_make.split(files["server"], tmp_path / "split", 2)
    split = Modelfile(parameters={"draft_model": str(shards[0])})
    o = await bare._with_draft("m", split, EngineOptions(), True)
    assert (o.draft_path, o.draft_splits) == (str(shards[0]), (str(shards[1]),))
    assert (await draft("other", plain)).draft_splits == ()
    second = f"{shards[1].name} is part of a model split into 2 files: name its first file"
    for wanted, why in [
        (str(tmp_path / "gone.gguf"), "does not exist"),
        ("no-such", "not found"),
        (str(shards[1]), second),
    ]:
        with pytest.raises(ModelLoadError, match=why):
            await bare._with_draft(
                "m", Modelfile(parameters={"draft_model": wanted}), options, True
            )
