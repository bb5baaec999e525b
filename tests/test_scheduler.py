"""The scheduler driven by fakes: an engine factory, a memory probe and a clock the test moves,
so loading, keep-alive, replicas, eviction, the memory watch and the out-of-memory retry are
tested without a process, a GPU or waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xllm.engine.options import EngineOptions
from xllm.engine.plugins import LoadSpec
from xllm.engine.scheduler import (
    GRACE_S,
    Scheduler,
    instance_key,
    is_out_of_memory,
    memory_pressure,
)
from xllm.errors import InsufficientMemory, ModelLoadError
from xllm.memory.planner import MiB, Plan
from xllm.memory.probe import GPU
from xllm.models.metadata import ModelInfo

TRAINED_CONTEXT = 4096
FAILED = "failed to load model 'm:latest' from /m.gguf: llama.cpp could not load /m.gguf"
CUDA_OOM = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)


class FakeClock:
    """Monotonic time that moves only when the test says; sleepers wake when it passes."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + seconds, fut))
        await fut

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(0.01)  # tasks just started reach their first sleep
        self.t += seconds
        due = [f for t, f in self._sleepers if t <= self.t]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.t]
        for f in due:
            if not f.done():
                f.set_result(None)
        await asyncio.sleep(0.02)  # the woken tasks run (the watch reads memory in a thread)


@dataclass
class FakeProbe:
    total: int = 64 * 1024 * MiB
    free: int = 32 * 1024 * MiB
    gpu_list: list[GPU] = field(default_factory=list)
    in_use: Callable[[], int] = lambda: 0
    """RAM taken out of `free` now (by the fake models loaded)."""

    def ram(self) -> tuple[int, int]:
        return self.total, self.free - self.in_use()

    def gpus(self) -> list[GPU]:
        return self.gpu_list


class FakeModel:
    """An engine as the scheduler sees it; records being closed and aborted."""

    def __init__(self, spec: LoadSpec, now: float) -> None:
        self.name = spec.name
        self.key = spec.key
        self.kind = spec.engine
        self.info = ModelInfo(
            name=spec.name, path=spec.path, architecture="llama",
            context_length=TRAINED_CONTEXT, embedding_length=0, block_count=0,
            parameter_count=0, size=0, quantization="none", chat_template=None,
        )  # fmt: skip
        self.ctx_size = min(spec.options.ctx_size, TRAINED_CONTEXT)
        self.plan = spec.plan
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = now
        self.on_exit: Callable[[Any], None] | None = None
        self.busy = False
        self.closed = False
        self.aborted: str | None = None

    def abort(self, reason: str) -> None:
        self.aborted = reason

    async def close(self) -> None:
        self.closed = True
        if self.on_exit is not None:
            self.on_exit(self)


class Factory:
    """`prepare` and `load` for the scheduler: every model plans `size` MiB of RAM (or its
    entry in `sizes`); loads wait for `gate` and fail for lack of memory above `fits` GPU
    layers."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sizes: dict[str, int] = {}
        self.size = 1024
        self.gpu_layers = 0
        self.fits: int | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.specs: list[LoadSpec] = []
        self.tries: list[int] = []
        """The GPU layers each load was asked for."""
        self.models: list[FakeModel] = []

    async def prepare(
        self, name: str, key: str, *, ctx_size: int | None, engine: str | None
    ) -> LoadSpec:
        size = self.sizes.get(name, self.size) * MiB
        plan = Plan(
            weights=size, kv=0, compute=0, output=0, layers=32, gpu_layers=self.gpu_layers, vram=0
        )
        options = EngineOptions(ctx_size=ctx_size or 2048, gpu_layers=-1, keep_alive_s=300)
        return LoadSpec(
            name=name, key=key, path=Path("/models") / name, format="gguf",
            architecture="llama", options=options, plan=plan, engine=engine or "fake",
        )  # fmt: skip

    async def load(self, spec: LoadSpec) -> FakeModel:
        self.specs.append(spec)
        o = spec.options
        layers = o.gpu_layers if o.gpu_layers >= 0 or spec.plan is None else spec.plan.gpu_layers
        self.tries.append(layers)
        await self.gate.wait()
        if self.fits is not None and layers > self.fits:
            raise ModelLoadError(FAILED, detail=CUDA_OOM)
        model = FakeModel(spec, self.clock.now())
        self.models.append(model)
        return model


@dataclass
class Rig:
    clock: FakeClock
    probe: FakeProbe
    factory: Factory
    make: Callable[..., Scheduler[FakeModel]]


@pytest.fixture()
async def rig() -> AsyncIterator[Rig]:
    clock = FakeClock()
    probe = FakeProbe()
    factory = Factory(clock)
    made: list[Scheduler[FakeModel]] = []

    def make(**kwargs: Any) -> Scheduler[FakeModel]:
        s = Scheduler(factory.prepare, factory.load, probe=probe, clock=clock, **kwargs)
        made.append(s)
        return s

    yield Rig(clock, probe, factory, make)
    for s in made:
        await s.close()


async def eventually(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def test_concurrent_callers_share_one_load(rig: Rig) -> None:
    s = rig.make()
    rig.factory.gate.clear()
    waiting = [asyncio.create_task(s.get("a")) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert [st.name for st in s.loading()] == ["a"] and s.loading_kinds() == ["fake"]
    rig.factory.gate.set()
    got = await asyncio.gather(*waiting)
    assert len(rig.factory.specs) == 1
    assert got[0] is got[1] is got[2] is s.loaded["a"]
    assert s.loading() == [] and s.loading_kinds() == []


async def test_a_caller_leaving_does_not_cancel_the_load(rig: Rig) -> None:
    s = rig.make()
    rig.factory.gate.clear()
    impatient = asyncio.create_task(s.get("a"))
    await asyncio.sleep(0.01)
    impatient.cancel()
    patient = asyncio.create_task(s.get("a"))
    rig.factory.gate.set()
    model = await patient
    assert model is s.loaded["a"] and len(rig.factory.specs) == 1


async def test_least_recently_used_is_evicted_for_room(rig: Rig) -> None:
    s = rig.make(budget=2048 * MiB)
    a = await s.get("a")
    await rig.clock.advance(5)
    b = await s.get("b")
    await rig.clock.advance(5)
    assert await s.get("a") is a  # a is now the more recently used
    await rig.clock.advance(5)
    c = await s.get("c")
    assert b.closed and not a.closed
    assert set(s.loaded) == {"a", "c"} and s.loaded["c"] is c


async def test_lower_priority_is_evicted_first(rig: Rig) -> None:
    s = rig.make(budget=2048 * MiB, priorities={"old": "high", "new": "low"})
    old = await s.get("old")
    await rig.clock.advance(5)
    new = await s.get("new")
    await rig.clock.advance(5)
    await s.get("third")
    assert new.closed and not old.closed  # low before least recently used


async def test_as_many_are_evicted_as_the_plan_needs(rig: Rig) -> None:
    s = rig.make(budget=3072 * MiB)
    rig.factory.sizes = {"big": 3072}
    small = [await s.get(n) for n in ("a", "b", "c")]
    await rig.clock.advance(5)
    await s.get("big")
    assert all(m.closed for m in small) and list(s.loaded) == ["big"]


async def test_free_ram_is_the_limit_without_a_budget(rig: Rig) -> None:
    rig.probe.free = 2000 * MiB  # room for one 1 GiB model, not two, with the safety margin
    rig.probe.in_use = lambda: sum(m.plan.ram for m in rig.factory.models if not m.closed)
    s = rig.make()
    a = await s.get("a")
    await rig.clock.advance(5)
    await s.get("b")
    assert a.closed and list(s.loaded) == ["b"]


async def test_busy_models_are_never_evicted(rig: Rig) -> None:
    s = rig.make(budget=2048 * MiB)
    a, b = await s.get("a"), await s.get("b")
    a.busy = b.busy = True
    await rig.clock.advance(5)
    with pytest.raises(
        InsufficientMemory, match=r"not enough memory to load c.*models in use: a, b"
    ):
        await s.get("c")
    assert not a.closed and not b.closed and "c" not in s.loaded


async def test_a_model_just_handed_out_gets_a_grace_before_eviction(rig: Rig) -> None:
    s = rig.make(budget=1024 * MiB)
    a = await s.get("a")
    loading = asyncio.create_task(s.get("b"))
    await asyncio.sleep(0.01)
    assert not a.closed and not loading.done()  # a was handed out this instant
    await rig.clock.advance(GRACE_S)
    await loading
    assert a.closed and list(s.loaded) == ["b"]


async def test_keep_alive_expiry(rig: Rig) -> None:
    s = rig.make()
    short = await s.get("short", keep_alive=5)
    forever = await s.get("forever", keep_alive=-1)
    await rig.clock.advance(3)
    assert not short.closed
    await rig.clock.advance(3)
    await eventually(lambda: short.closed)
    assert list(s.loaded) == ["forever"]
    await rig.clock.advance(10_000)
    assert not forever.closed


async def test_keep_alive_waits_for_running_requests(rig: Rig) -> None:
    s = rig.make()
    m = await s.get("a", keep_alive=2)
    m.busy = True
    await rig.clock.advance(10)
    assert not m.closed
    m.busy = False
    await rig.clock.advance(0.5)
    await eventually(lambda: m.closed)


async def test_keep_alive_zero_still_leaves_a_grace(rig: Rig) -> None:
    s = rig.make()
    m = await s.get("a", keep_alive=0)
    await rig.clock.advance(0.5)
    assert not m.closed  # the handler that just got it has yet to start its request
    await rig.clock.advance(GRACE_S)
    await eventually(lambda: m.closed)


async def test_replicas_take_requests_in_turn(rig: Rig) -> None:
    s = rig.make(replicas={"a": 3})
    got = [await s.get("a") for _ in range(4)]
    assert [m.key for m in got] == ["a", "a#2", "a#3", "a"]
    assert got[0] is got[3] and len(rig.factory.specs) == 3
    assert sorted(s.loaded) == ["a", "a#2", "a#3"]
    await s.get("a", keep_alive=-1)  # a request's keep_alive applies to every replica
    assert [m.keep_alive for m in s.instances("a")] == [-1, -1, -1]
    assert await s.unload("a") is True
    assert all(m.closed for m in got) and s.loaded == {}
    assert await s.unload("a") is False


async def test_preload_loads_every_replica(rig: Rig) -> None:
    s = rig.make(replicas={"a": 2})
    await s.preload("a")
    assert sorted(s.loaded) == ["a", "a#2"]
    assert [spec.key for spec in rig.factory.specs] == ["a", "a#2"]


async def test_memory_watch_unloads_the_least_valuable_idle_model(rig: Rig) -> None:
    s = rig.make(high_watermark=0.9, priorities={"low": "low"})
    low, old, new = await s.get("low"), await s.get("old"), await s.get("new")
    await rig.clock.advance(2)
    await s.get("new")  # used again: the most valuable normal model
    rig.probe.gpu_list = [GPU(0, "A", 100, 50, "x"), GPU(1, "B", 100, 5, "x")]  # GPU 1 at 95 %
    await rig.clock.advance(1)
    await eventually(lambda: low.closed)
    assert not old.closed  # one a second, so memory can settle
    await rig.clock.advance(1)
    await eventually(lambda: old.closed)
    assert not new.closed  # handed out less than the grace ago
    rig.probe.gpu_list = [GPU(0, "A", 100, 50, "x")]
    await rig.clock.advance(5)
    assert not new.closed and list(s.loaded) == ["new"]


async def test_memory_watch_spares_busy_models(rig: Rig) -> None:
    rig.probe.free = rig.probe.total // 20
    s = rig.make()
    m = await s.get("a")
    m.busy = True
    for _ in range(3):
        await rig.clock.advance(1)
    assert not m.closed


@pytest.mark.parametrize(("fits", "tries"), [(16, [32, 16]), (40, [32])])
async def test_out_of_memory_retries_once_with_half_the_layers(
    rig: Rig, fits: int, tries: list[int]
) -> None:
    rig.factory.gpu_layers, rig.factory.fits = 32, fits
    s = rig.make()
    model = await s.get("m")
    assert rig.factory.tries == tries and s.loaded["m"] is model


async def test_out_of_memory_twice_gives_up(rig: Rig) -> None:
    rig.factory.gpu_layers, rig.factory.fits = 32, 3
    s = rig.make()
    with pytest.raises(ModelLoadError) as e:
        await s.get("m")
    assert e.value.message == FAILED and e.value.detail == CUDA_OOM
    assert rig.factory.tries == [32, 16]  # one retry, not a search
    assert s.loaded == {} and s.loading() == []


async def test_no_retry_on_cpu_or_for_other_errors(rig: Rig) -> None:
    rig.factory.gpu_layers, rig.factory.fits = 0, -1
    s = rig.make()
    with pytest.raises(ModelLoadError):
        await s.get("m")
    assert rig.factory.tries == [0]

    async def broken(spec: LoadSpec) -> FakeModel:
        rig.factory.tries.append(spec.plan.gpu_layers if spec.plan else -1)
        raise ModelLoadError(FAILED, detail="unknown model architecture 'foo'")

    rig.factory.gpu_layers, rig.factory.tries = 32, []
    s = Scheduler(rig.factory.prepare, broken, probe=rig.probe, clock=rig.clock)
    with pytest.raises(ModelLoadError):
        await s.get("m")
    assert rig.factory.tries == [32]


async def test_another_context_reloads_once_requests_are_done(rig: Rig) -> None:
    s = rig.make()
    first = await s.get("a")
    assert first.ctx_size == 2048
    assert await s.get("a") is first  # no context asked: the model as it is
    assert await s.get("a", ctx_size=2048) is first
    first.busy = True
    reload = asyncio.create_task(s.get("a", ctx_size=1024))
    await rig.clock.advance(1)
    assert not reload.done() and not first.closed
    first.busy = False
    await rig.clock.advance(0.05)
    second = await reload
    assert first.closed and second.ctx_size == 1024 and s.loaded["a"] is second
    assert rig.factory.specs[-1].options.ctx_size == 1024


async def test_a_context_past_the_trained_one_does_not_reload(rig: Rig) -> None:
    s = rig.make()
    first = await s.get("a", ctx_size=TRAINED_CONTEXT)
    assert await s.get("a", ctx_size=4 * TRAINED_CONTEXT) is first  # capped the same
    assert len(rig.factory.specs) == 1


async def test_a_forced_engine_reloads_a_model_loaded_by_another(rig: Rig) -> None:
    s = rig.make()
    first = await s.get("a")
    assert await s.get("a", engine="fake") is first
    other = await s.get("a", engine="other")
    assert first.closed and other.kind == "other" and rig.factory.specs[-1].engine == "other"
    assert await s.get("a") is other  # not forced: whatever engine has it


async def test_an_engine_that_exits_is_loaded_afresh(rig: Rig) -> None:
    s = rig.make()
    first = await s.get("a")
    await first.close()  # as a runner that crashed reports itself
    assert s.loaded == {}
    second = await s.get("a")
    assert second is not first and s.loaded["a"] is second


async def test_an_engine_that_stops_itself_to_be_restarted_is_loaded_again_at_once(
    rig: Rig,
) -> None:
    s = rig.make()
    first = await s.get("a", keep_alive=60)
    first.restart = True  # type: ignore[attr-defined]  # as the diffusion engine sets it
    await first.close()  # its runner killed to cancel a generation
    await eventually(lambda: "a" in s.loaded)
    again = s.loaded["a"]
    assert again is not first and len(rig.factory.specs) == 2
    assert again.keep_alive == 60  # as the request that loaded it asked
    assert await s.get("a") is again  # the next request finds it loaded


async def test_an_unloaded_engine_is_not_restarted(rig: Rig) -> None:
    s = rig.make()
    first = await s.get("a")
    first.restart = True  # type: ignore[attr-defined]
    assert await s.unload("a")
    second = await s.get("b", keep_alive=0)  # to be unloaded once idle anyway
    second.restart = True  # type: ignore[attr-defined]
    await second.close()
    await asyncio.sleep(0.05)
    assert s.loaded == {} and len(rig.factory.specs) == 2


async def test_room_beyond_a_plan_unloads_idle_others_or_refuses(rig: Rig) -> None:
    s = rig.make(budget=3072 * MiB)
    a, b = await s.get("a"), await s.get("b")
    await rig.clock.advance(5)
    async with s.room("b", 0, "nothing"), s.room("b", 1024 * MiB, "a large image"):
        assert not a.closed  # it fits beside both
        with pytest.raises(InsufficientMemory, match="for another image on b"):
            async with s.room("b", 2048 * MiB, "another image"):  # held: a goes, still short
                pass
    assert a.closed and list(s.loaded) == ["b"]
    async with s.room("b", 2048 * MiB, "a larger image"):  # the held bytes were given back
        pass
    with pytest.raises(
        InsufficientMemory, match=r"for a huge image on b: it needs 3072 MiB beyond"
    ):
        async with s.room("b", 3072 * MiB, "a huge image"):
            pass
    assert not b.closed
    await s.get("c")  # nothing is held any more: c loads beside b
    assert list(s.loaded) == ["b", "c"]


async def test_abort_and_close(rig: Rig) -> None:
    s = rig.make()
    a, b = await s.get("a"), await s.get("b")
    s.abort("shutting down")
    assert a.aborted == b.aborted == "shutting down"
    rig.factory.gate.clear()
    pending = asyncio.create_task(s.get("c"))
    await asyncio.sleep(0.01)
    await s.close()
    assert a.closed and b.closed and s.loaded == {}
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_loads_are_observed(rig: Rig) -> None:
    seen: list[tuple[str, float]] = []

    class Observer:
        def observe_finish(self, model: str, finish: str, extra: Any) -> None: ...

        def observe_load(self, model: str, seconds: float) -> None:
            seen.append((model, seconds))

    async def prepare(name: str, key: str, *, ctx_size: int | None, engine: str | None) -> Any:
        spec = await rig.factory.prepare(name, key, ctx_size=ctx_size, engine=engine)
        return LoadSpec(**{**spec.__dict__, "observer": Observer()})

    s = Scheduler(prepare, rig.factory.load, probe=rig.probe, clock=rig.clock)
    await s.get("a")
    await s.close()
    assert seen == [("a", 0.0)]  # on the scheduler's clock


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        (CUDA_OOM, True),
        ("ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 2147483648", True),
        ("ErrorOutOfDeviceMemory", True),
        ("llama.cpp could not load /m.gguf: unknown model architecture 'foo'", False),
        ("runner exited with SIGSEGV", False),
    ],
)
def test_out_of_memory_messages(message: str, oom: bool) -> None:
    assert is_out_of_memory(message) is oom


def test_instance_keys() -> None:
    assert [instance_key("m:latest", i) for i in range(3)] == [
        "m:latest",
        "m:latest#2",
        "m:latest#3",
    ]


def test_memory_pressure_takes_the_fullest() -> None:
    probe = FakeProbe(total=100, free=40)
    assert memory_pressure(probe) == (0.6, "RAM")
    probe.gpu_list = [GPU(0, "A", 100, 50, "x"), GPU(1, "B", 100, 5, "x")]
    used, where = memory_pressure(probe)
    assert where == "GPU 1 memory" and used == pytest.approx(0.95)
