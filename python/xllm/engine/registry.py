"""Models by name: which names resolve to which files, what those files are, and what loading
one takes (engine, files, options from the server and the Modelfile, memory plan).

Loading itself, keep-alive, replicas and eviction are the scheduler's (`engine/scheduler.py`),
which the registry drives: `get`, `preload` and `unload` take any name a request may use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines, LoadSpec, Manifest
from xllm.engine.protocol import Capability, Engine, Observer
from xllm.engine.remote import KIND as REMOTE
from xllm.engine.remote import capabilities as remote_capabilities
from xllm.engine.remote import context_length as remote_context
from xllm.engine.scheduler import HIGH_WATERMARK, LoadState, Scheduler, is_out_of_memory
from xllm.engine.upstream import Remotes, Target
from xllm.errors import CorruptModel, InvalidRequest, ModelLoadError, ModelNotFound
from xllm.models import gguf, gotemplate, names, summary
from xllm.models import projector as mmproj
from xllm.models.modelfile import Modelfile, is_go_template
from xllm.models.speech import SpeechModelError
from xllm.models.store import (
    ADAPTER,
    GGUF,
    PROJECTOR,
    REMOTE_FORMAT,
    SAFETENSORS_FORMAT,
    Store,
    StoredModel,
)

log = logging.getLogger("xllm.models")


@dataclass(frozen=True)
class Resolved:
    name: str
    path: Path
    stored: StoredModel | None = None
    """Set for a model from the store: its manifest and Modelfile."""
    projector: Path | None = None
    """A vision model's projector file."""
    remote: Target | None = None
    """Set for a remote model: its endpoint and its name there (`path` is `remote:EP/name`)."""


def _gguf_files(path: Path, stored: StoredModel | None) -> list[Path]:
    """Every file of a GGUF model, in order: a stored one's blobs (whose names llama.cpp could
    not find a split model's shards by), else `path` and a split model's siblings beside it."""
    return list(stored.files) if stored is not None else gguf.model_files(path)


class ModelRegistry:
    """Resolves model names; loads them through its scheduler."""

    def __init__(
        self,
        options: EngineOptions,
        observer: Observer | None = None,
        budget: int | None = None,
        priorities: dict[str, str] | None = None,
        store: Store | None = None,
        replicas: dict[str, int] | None = None,
        speculative: dict[str, str] | None = None,
        drafts: dict[str, str] | None = None,
        high_watermark: float = HIGH_WATERMARK,
        engines: Engines | None = None,
        remotes: Remotes | None = None,
    ) -> None:
        self.options = options
        self.remotes = remotes if remotes is not None else Remotes()
        """The remote endpoints (`engines.remote`) and the local names of their models."""
        self._remote_names = {
            names.parse_name(local).display: t for local, t in self.remotes.named().items()
        }
        self._started = time.time()
        """The server's engine options, under each model's Modelfile and each request's."""
        self.engines = engines if engines is not None else Engines.discover()
        """The engines that serve models, by format and architecture (engine/plugins.py)."""
        self.observer = observer
        self.store = store
        """Pulled and created models; resolved after command-line paths, before bundled ones."""
        self._paths: dict[str, Path] = {}
        self._speculative = {self.key(k): v for k, v in (speculative or {}).items()}
        """Models whose requests speculate otherwise than the server's `speculative` says."""
        self._drafts = {self.key(k): v for k, v in (drafts or {}).items()}
        """Models with a draft model of their own (over the server's `draft_model`)."""
        self._projectors: dict[str, Path] = {}
        self.scheduler: Scheduler[Engine] = Scheduler(
            self.prepare,
            self.start,
            budget=budget,
            priorities={self.key(k): v for k, v in (priorities or {}).items()},
            replicas={self.key(k): v for k, v in (replicas or {}).items()},
            high_watermark=high_watermark,
        )

    def add_path(self, path: Path, projector: Path | None = None) -> str:
        """Make a model file or folder (given on the command line) servable, with its vision
        `projector` if it has one (checked to fit it: a 400 otherwise); returns its name."""
        name = names.name_for_path(path)
        if projector is not None:
            model = summary.of_file(path)
            where = f"{projector.name} for {path.name}"
            mmproj.check_fits(mmproj.read(projector), model.embedding_length, where, "mmproj")
            self._projectors[name] = projector.resolve()
        self._paths[name] = path.resolve()
        return name

    def stored(self, name: str) -> StoredModel | None:
        """The store's model of that name (an invalid name is a 400); None for a manifest that
        cannot be read, which `find` reports."""
        return self.store.get(names.parse_name(name)) if self.store is not None else None

    def key(self, name: str) -> str:
        """The name a model is known by: `model` -> `model:latest`; aliases of bundled models
        apply unless a model of that very name is served from a path or the store."""
        key = names.parse_name(name).display
        alias = names.ALIASES.get(key)
        if alias is None or key in self._paths or self.stored(key) is not None:
            return key
        return alias

    def find(self, name: str, engine: str | None = None) -> Resolved:
        """Where a requested name's model is: a command-line path, the store, a bundled model,
        then a remote endpoint's model, in that order (`engine: remote` takes the remote one
        where a name has both); ModelNotFound otherwise. `remote:ENDPOINT/model` names a model
        of a configured endpoint directly."""
        target = self.remotes.parse(name)
        if target is not None:
            return Resolved(target.name, Path(target.name), remote=target)
        key = self.key(name)
        remote = self._remote_names.get(key)
        local: Resolved | None = None
        if engine != REMOTE or remote is None:
            local = self._find_local(key)
        if local is not None:
            return local
        if remote is not None:
            # a name with a local model too is loaded under the remote one's own name (it was
            # looked for above unless `engine: remote` skipped that)
            own = engine != REMOTE or self._find_local(key) is None
            return Resolved(key if own else remote.name, Path(remote.name), remote=remote)
        raise ModelNotFound(f"model {name!r} not found", param="model")

    def _find_local(self, key: str) -> Resolved | None:
        path = self._paths.get(key)
        if path is not None:
            return Resolved(key, path, projector=self._projectors.get(key))
        stored = self.store.find(names.parse_name(key)) if self.store is not None else None
        if stored is not None:
            return Resolved(
                key, stored.model_path, stored, stored.projector_path, self._stored_target(stored)
            )
        path = names.bundled_path(key)
        return Resolved(key, path) if path is not None else None

    def _stored_target(self, stored: StoredModel) -> Target | None:
        """A stored remote model's (`FROM remote:ENDPOINT/model`) target; a 400 when this
        server has no such endpoint."""
        if stored.format != REMOTE_FORMAT:
            return None
        target = self.remotes.parse(stored.remote or "", param="model")
        if target is None:
            raise InvalidRequest(f"model {stored.name.display!r} names no remote endpoint")
        return target

    def remote_summary(self, target: Target) -> summary.Summary:
        """What show, list and /v1/models tell of a remote model (what its upstream lists)."""
        entry = target.pool.models.get(target.model) or {}
        context = remote_context(target)
        # Ollama's clients read the context from `model_info["<architecture>.context_length"]`,
        # as a GGUF header's metadata has it for local models
        said = {f"{REMOTE}.context_length": context} if context else {}
        return summary.Summary(
            architecture=REMOTE, parameter_count=0, quantization=REMOTE,
            context_length=context, embedding_length=0, block_count=0,
            capabilities=[c.value for c in Capability if c in remote_capabilities(target)],
            chat_template=None, license=None, format=REMOTE_FORMAT,
            model_info={
                "general.architecture": REMOTE, "remote.endpoint": target.pool.name,
                "remote.model": target.model, "remote.flavour": target.pool.endpoint.flavour,
                "remote.listed": bool(entry), **said,
            },
        )  # fmt: skip

    def modified(self, found: Resolved) -> float:
        """When a model last changed: its manifest's or file's time; for a remote model of the
        configuration, when this server started."""
        if found.stored is not None:
            return found.stored.modified
        if found.remote is not None:
            return self._started
        return found.path.stat().st_mtime

    def facts(self, found: Resolved) -> summary.Summary:
        """What `show`, `list` and `/v1/models` tell of a model not loaded: a stored one's
        cached facts (whatever its format), a file's from its GGUF header."""
        if found.remote is not None:
            return self.remote_summary(found.remote)
        if found.stored is not None and self.store is not None:
            with self.reading(found):
                facts = self.store.summary_of(found.stored.manifest)
        else:
            facts = summary.of_file(found.path)
        if found.projector is None:
            return facts
        with self.reading(found):
            projector = mmproj.read(found.projector)
        caps = facts.capabilities + ["vision"] * ("vision" not in facts.capabilities)
        return dataclasses.replace(facts, capabilities=caps, projector_info=projector.info)

    @contextlib.contextmanager
    def reading(self, found: Resolved) -> Iterator[None]:
        """Around a read of a model's files (in a worker thread): a stored model's file that
        fails to read and no longer matches its digest is the server's 500 (CorruptModel), not
        the client's 400 of a malformed file."""
        try:
            yield
        except (InvalidRequest, OSError):
            corrupt = self.corruption(found.stored) if found.stored is not None else None
            if corrupt is not None:
                raise corrupt from None
            raise

    def resolve(self, name: str) -> tuple[str, Path]:
        """(canonical name, file) for a requested name, or ModelNotFound."""
        found = self.find(name)
        return found.name, found.path

    def available(self) -> list[str]:
        """Every name a request may use right now."""
        bundled = [n for n in names.BUNDLED if names.bundled_path(n) is not None]
        stored = [m.name.display for m in self.store.list()] if self.store is not None else []
        loaded = {m.name for m in self.scheduler.loaded.values()}
        every = set(self._paths) | loaded | set(bundled) | set(stored) | set(self._remote_names)
        return sorted(every)

    def engine_for(self, found: Resolved, engine: str | None = None) -> tuple[Manifest, str]:
        """(the engine for a model, its architecture); a 400 before anything loads when no
        engine serves the model (naming its architecture) or the one asked for cannot."""
        with self.reading(found):
            facts = self.facts(found)
        try:
            return self.engines.for_model(
                found.name, facts.format, facts.architecture, engine
            ), facts.architecture
        except InvalidRequest:
            if facts.format == SAFETENSORS_FORMAT and found.stored is not None and engine is None:
                raise self._unservable(found.stored, facts.architecture) from None
            raise

    async def get(
        self,
        name: str,
        keep_alive: float | None = None,
        ctx_size: int | None = None,
        engine: str | None = None,
    ) -> Engine:
        """The loaded model for `name`, loading it first if needed (see `Scheduler.get`). An
        unknown name is a 404 and an `engine` that cannot serve the model a 400, before
        anything loads."""
        found = self.find(name, engine)
        if engine is not None:
            await asyncio.to_thread(self.engine_for, found, engine)
        if found.remote is not None:
            ctx_size = None  # the upstream's context is its own
        return await self.scheduler.get(found.name, keep_alive, ctx_size, engine)

    async def preload(self, name: str) -> None:
        """Load a model and all its replicas."""
        await self.scheduler.preload(self.find(name).name)

    async def unload(self, name: str) -> bool:
        """Stop a loaded model (every replica); False if it was not loaded."""
        target = self.remotes.parse(name)
        return await self.scheduler.unload(target.name if target else self.key(name))

    @property
    def loaded(self) -> dict[str, Engine]:
        """The loaded instances by key (`name`, `name#2`...)."""
        return self.scheduler.loaded

    def loading(self) -> list[LoadState]:
        return self.scheduler.loading()

    def loading_kinds(self) -> list[str]:
        return self.scheduler.loading_kinds()

    def abort(self, reason: str) -> None:
        self.scheduler.abort(reason)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.remotes.close()

    async def prepare(
        self, name: str, key: str, *, ctx_size: int | None, engine: str | None
    ) -> LoadSpec:
        """What loading instance `key` of model `name` takes (the scheduler's `prepare`): the
        engine its format and architecture pick (or `engine`), its files, the server's options
        under its Modelfile's and then `ctx_size`, and the engine's memory plan."""
        found = self.find(name, engine)
        manifest, architecture = await asyncio.to_thread(self.engine_for, found, engine)
        path, stored = found.path, found.stored
        modelfile = stored.modelfile if stored is not None else Modelfile()
        if found.remote is not None:
            return LoadSpec(
                name=name, key=key, path=path, format=REMOTE_FORMAT, architecture=REMOTE,
                options=self.options, modelfile=modelfile, observer=self.observer,
                engine=manifest.name, remote=found.remote,
            )  # fmt: skip
        async with self._recording(manifest.name, name, path):
            fmt = (await asyncio.to_thread(self.facts, found)).format
            files: tuple[Path, ...] = (path,)
            if fmt == GGUF:
                files = tuple(await asyncio.to_thread(_gguf_files, path, stored))
            elif stored is not None and self.store is not None:  # its folder, made on first use
                path = await asyncio.to_thread(self.store.model_dir, stored)
                files = (path,)
            options = _with_modelfile(self.options, name, modelfile)
            speculative = self._speculative.get(self.key(name))
            if speculative is not None:
                options = dataclasses.replace(options, speculative=speculative)
            if fmt == GGUF:
                options = await self._with_draft(name, modelfile, options, speculative is None)
            if ctx_size is not None:  # the request's, over the Modelfile's and the server's
                options = dataclasses.replace(options, ctx_size=ctx_size)
            spec = LoadSpec(
                name=name, key=key, path=path, format=fmt, architecture=architecture,
                options=options, modelfile=modelfile, files=files,
                adapters=tuple(stored.adapter_paths) if stored is not None else (),
                projector=found.projector, observer=self.observer, engine=manifest.name,
            )  # fmt: skip
            if manifest.estimate is not None:
                plan = await asyncio.to_thread(manifest.estimate, spec)
                spec = dataclasses.replace(spec, plan=plan)
        return spec

    async def _with_draft(
        self, name: str, modelfile: Modelfile, options: EngineOptions, default_mode: bool
    ) -> EngineOptions:
        """`options` with the model's draft model (its own in config.yaml, else its Modelfile's,
        else the server's) resolved to its GGUF file; a model with a draft drafts with it unless
        its speculation is set otherwise (`default_mode`: it is not, for this model)."""
        wanted = self._drafts.get(self.key(name)) or modelfile.parameters.get("draft_model")
        wanted = wanted or self.options.draft_model
        if not wanted:
            return dataclasses.replace(options, draft_model=None, draft_path=None, draft_splits=())
        draft, files = await asyncio.to_thread(self._draft_files, name, str(wanted))
        options = dataclasses.replace(
            options, draft_model=draft, draft_path=str(files[0]),
            draft_splits=tuple(map(str, files[1:])),
        )  # fmt: skip
        if default_mode and options.speculative == "none":
            options = dataclasses.replace(options, speculative="draft")
        return options

    def _draft_files(self, name: str, wanted: str) -> tuple[str, list[Path]]:
        """(name, GGUF files: one, or each of a split model in order) of the draft model
        `wanted` (a GGUF file or a model's name) of model `name`; a ModelLoadError saying why
        there is none."""
        given = Path(wanted).expanduser()
        if given.suffix == ".gguf" or given.is_file():
            if not given.is_file():
                raise ModelLoadError(f"the draft model file {wanted} of {name!r} does not exist")
            draft, path, stored = names.name_for_path(given), given.resolve(), None
        else:
            try:
                found = self.find(wanted)
            except ModelNotFound:
                raise ModelLoadError(
                    f"the draft model {wanted!r} of {name!r} was not found"
                ) from None
            if found.remote is not None or self.facts(found).format != GGUF:
                raise ModelLoadError(
                    f"the draft model {wanted!r} of {name!r} is not a GGUF model llama.cpp loads"
                )
            draft, path, stored = found.name, found.path, found.stored
        try:
            return draft, _gguf_files(path, stored)
        except gguf.GGUFError as e:
            raise ModelLoadError(f"the draft model {wanted!r} of {name!r}: {e}") from None

    async def start(self, spec: LoadSpec) -> Engine:
        """Load `spec` with its engine (the scheduler's engine factory)."""
        async with self._recording(spec.engine, spec.name, spec.path):
            model = await self.engines.manifests[spec.engine].load(spec)
        self.engines.failures.pop(spec.engine, None)
        return model

    @contextlib.asynccontextmanager
    async def _recording(self, engine: str, name: str, path: Path) -> AsyncIterator[None]:
        """Around reading a model's files and loading it: a failure is the engine's last error
        (`/v0/health`), and a CorruptModel instead when a stored model's file is no longer what
        was downloaded (running out of memory is never the file's fault)."""
        try:
            yield
        except (gguf.GGUFError, SpeechModelError, ModelLoadError, OSError) as e:
            self.engines.failures[engine] = getattr(e, "message", str(e))
            if isinstance(e, ModelLoadError) and is_out_of_memory(f"{e.message}\n{e.detail}"):
                raise
            stored = self.stored(name)
            if stored is not None and stored.model_path == path:
                corrupt = await asyncio.to_thread(self.corruption, stored)
                if corrupt is not None:
                    raise corrupt from None
            raise

    def _unservable(self, stored: StoredModel, architecture: str) -> InvalidRequest:
        """The 400 for a stored Hugging Face model no engine serves, with the command that
        converts it to a GGUF llama.cpp serves: refused before anything loads."""
        name = stored.name.display
        return InvalidRequest(
            f"model {name!r} is in safetensors format ({architecture}), which no engine of this "
            "server serves; llama.cpp serves GGUF models: convert it once with "
            f"`echo 'FROM {name}' > Modelfile && xllm create "
            f"{stored.name.model.lower()}-gguf -f Modelfile` (or to a file: `xllm convert {name} "
            f"{stored.name.model.lower()}.gguf`), then use that model",
            param="model",
        )

    def corruption(self, stored: StoredModel) -> CorruptModel | None:
        """After a stored model's file failed to read or load: the error to give instead when
        a file is no longer what was downloaded (the server's disk, not the request, is at
        fault), or None. Reads every file in full."""
        if self.store is None:
            return None
        if stored.format == GGUF:
            layers = [stored.model_digest, *stored.shard_digests]
            layers += [
                x.digest for x in (*stored.manifest.all(ADAPTER), *stored.manifest.all(PROJECTOR))
            ]
        else:
            layers = [digest for _, digest in stored.named_files]
        digest = self.store.verify(layers)
        if digest is None:
            return None
        path = self.store.blob_path(digest)
        state = "no longer matches its digest" if path.exists() else "is missing; its digest is"
        name = stored.name.display
        return CorruptModel(
            f"model {name!r} is corrupt on disk: its file {path} {state} {digest}; remove it "
            f"with `xllm rm {name}` and download it again with `xllm pull {name}`"
        )


def _with_modelfile(options: EngineOptions, name: str, modelfile: Modelfile) -> EngineOptions:
    """A stored model's Modelfile at load: `num_ctx` sizes its context, its TEMPLATE (Jinja2,
    or Ollama's Go syntax translated) replaces the GGUF's chat template (the rest applies per
    request, in the serving layer)."""
    num_ctx = modelfile.parameters.get("num_ctx")
    if isinstance(num_ctx, int) and num_ctx > 0:
        options = dataclasses.replace(options, ctx_size=num_ctx)
    template = modelfile.template
    if template and is_go_template(template):
        try:
            template = gotemplate.to_jinja(template)
        except gotemplate.GoTemplateError as e:
            log.warning("model %s: %s; the model's own chat template is used", name, e.message)
            template = None
    if template:
        options = dataclasses.replace(options, chat_template=template)
    return options
