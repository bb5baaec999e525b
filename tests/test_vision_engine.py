"""Image input through the llama.cpp engine: a real runner process, libmtmd and the Rust loop,
on the tinycoder model with a tiny random-weight `mlp` projector, and on the real Gemma 3 270M
with a random `gemma3` one (tests/projectors.py).

Random weights describe nothing, so these tests check the plumbing: image tokens in the
prompt, determinism, that pixels reach the model, the prefix cache over images, encoding off
the decode thread, cancellation and errors. The HTTP shapes are tested with the API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.projectors import image_tokens, write_projector
from xllm.engine.llama import MANIFEST, RunnerClient
from xllm.engine.options import EngineOptions
from xllm.engine.plugins import LoadSpec
from xllm.engine.protocol import Generation, Image, Part, Request, Sampling
from xllm.errors import InvalidRequest, ModelLoadError

MARKER = "<__media__>"
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
GREEDY = Sampling(temperature=0, max_tokens=8, ignore_eos=True)


def image(rgb: tuple[int, int, int], width: int = 40, height: int = 30) -> Image:
    data = bytes(rgb) * (width * height)
    return Image(width, height, data, hashlib.sha256(data).hexdigest())


RED = image((255, 0, 0))
BLUE = image((0, 0, 255))


@dataclass
class Result:
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    finish: str | None = None
    error: Any = None


async def run(gen: Generation) -> Result:
    out = Result()
    async for batch in gen.deltas():
        for d in batch:
            out.text += d.text
            out.logprobs += [lp[1] for lp in d.logprobs or ()]
            if d.finish is not None:
                out.finish, out.usage, out.error = d.finish, dict(d.usage or {}), d.error
    return out


async def load(model: Path, projector: Path | None, **options: Any) -> RunnerClient:
    opts = EngineOptions(**{"ctx_size": 512, "parallel": 2, "threads": 2, **options})
    spec = LoadSpec("tiny:latest", "tiny:latest", model, "gguf", "llama", opts, projector=projector)
    engine = await MANIFEST.load(spec)
    assert isinstance(engine, RunnerClient)
    return engine


@pytest.fixture(scope="session")
def projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `mlp` projector for tinycoder (embedding size 16): 16 tokens an image."""
    return write_projector(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", 16)


@pytest.fixture(scope="session")
def slow_projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bigger one whose encoding takes a while (224 px, 256 patches through 12 layers):
    long enough that a scheduling hiccup on a busy machine is small beside it."""
    path = tmp_path_factory.mktemp("mmproj") / "slow.gguf"
    return write_projector(path, 16, n_embd=384, n_ff=768, n_layer=12, image_size=224, patch=14)


@pytest.fixture
async def vision(tiny_path: Path, projector: Path) -> AsyncIterator[RunnerClient]:
    engine = await load(tiny_path, projector)
    yield engine
    await engine.close()


def completion(*parts: str | Image, sampling: Sampling = GREEDY) -> Request:
    return Request(
        prompt=[Part("image", image=p) if isinstance(p, Image) else Part("text", p) for p in parts],
        sampling=sampling,
    )


async def test_a_projector_makes_a_vision_model(vision: RunnerClient, tiny_path: Path) -> None:
    assert "vision" in vision.capabilities
    assert vision.info.image_marker == MARKER
    plain = await load(tiny_path, None)
    try:
        assert "vision" not in plain.capabilities
        with pytest.raises(InvalidRequest, match="does not support images") as e:
            await plain.generate(completion("look: ", RED))
        assert e.value.param == "images"
        assert (await run(await plain.generate(completion("hello")))).finish == "length"
    finally:
        await plain.close()


async def test_an_image_adds_its_tokens_to_the_prompt(vision: RunnerClient) -> None:
    text = await run(await vision.generate(completion("describe this: ")))
    one = await run(await vision.generate(completion("describe this: ", RED)))
    two = await run(await vision.generate(completion("describe this: ", RED, " and ", BLUE)))
    and_tokens = len(await vision.tokenize(" and ", special=False))
    assert one.finish == two.finish == "length"
    assert one.usage["prompt_tokens"] == text.usage["prompt_tokens"] + image_tokens()
    assert two.usage["prompt_tokens"] == one.usage["prompt_tokens"] + and_tokens + image_tokens()


async def test_pixels_reach_the_model(vision: RunnerClient) -> None:
    sampling = Sampling(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    red = await run(await vision.generate(completion("what is ", RED, " here", sampling=sampling)))
    again = await run(
        await vision.generate(completion("what is ", RED, " here", sampling=sampling))
    )
    blue = await run(
        await vision.generate(completion("what is ", BLUE, " here", sampling=sampling))
    )
    assert red.text == again.text and red.logprobs == pytest.approx(again.logprobs, abs=1e-4)
    assert red.logprobs[0] != pytest.approx(blue.logprobs[0], abs=1e-4)
    assert red.text != blue.text


async def test_an_image_is_preprocessed_once(vision: RunnerClient) -> None:
    """Tokenizing preprocesses an image (to count its tokens); its encode takes that work
    instead of doing it again."""
    await asyncio.sleep(0.5)  # the runner reports its counters every 0.25 s
    before = vision.stats()
    green = image((0, 200, 0), width=300, height=200)
    await run(await vision.generate(completion("what is ", green, " here")))
    await asyncio.sleep(0.5)
    after = vision.stats()
    assert after["images_encoded_total"] == before["images_encoded_total"] + 1
    assert after["images_preprocessed_total"] == before["images_preprocessed_total"] + 1


async def test_a_second_turn_reuses_the_encoded_image(vision: RunnerClient) -> None:
    first = [{"role": "user", "content": "what is this?", "images": [RED]}]
    one = await run(
        await vision.generate(Request(messages=first, template=TEMPLATE, sampling=GREEDY))
    )
    await asyncio.sleep(0.5)  # the runner reports its counters every 0.25 s
    encoded = vision.stats()["images_encoded_total"]
    follow = [
        *first,
        {"role": "assistant", "content": one.text},
        {"role": "user", "content": "sure?"},
    ]
    two = await run(
        await vision.generate(Request(messages=follow, template=TEMPLATE, sampling=GREEDY))
    )
    assert two.finish == "length"
    # everything up to the first answer was in the cache, the image included
    assert two.usage["cached_tokens"] > image_tokens()
    assert two.usage["cached_tokens"] >= one.usage["prompt_tokens"]
    await asyncio.sleep(0.5)  # the runner reports its counters every 0.25 s
    assert vision.stats()["images_encoded_total"] == encoded
    # another image at the same place is a cache miss from its first token on
    other = [{**first[0], "images": [BLUE]}, *follow[1:]]
    three = await run(
        await vision.generate(Request(messages=other, template=TEMPLATE, sampling=GREEDY))
    )
    assert three.usage["cached_tokens"] < image_tokens()


async def test_a_draft_model_drafts_for_an_image_prompt(tiny_path: Path, projector: Path) -> None:
    # the model drafting for itself: the draft reads the text around the image (issue 17);
    # drafting every step, as a draft as dear as the model never pays
    engine = await load(tiny_path, projector, draft_path=str(tiny_path), draft_model="tiny")
    try:
        long = Sampling(temperature=0, max_tokens=24, ignore_eos=True)
        results = {}
        for mode in ("none", "draft"):
            sampling = dataclasses.replace(
                long, speculative=mode, max_draft=4, draft_min_p=0, draft_adaptive=False
            )
            gen = await engine.generate(completion("what is ", RED, " here", sampling=sampling))
            results[mode] = await run(gen)
        plain, drafted = results["none"], results["draft"]
        assert drafted.text == plain.text and drafted.finish == "length"
        assert drafted.usage.get("accepted_prediction_tokens", 0) > 0, drafted.usage
        assert "accepted_prediction_tokens" not in plain.usage
    finally:
        await engine.close()


async def test_several_images_in_a_chat(vision: RunnerClient) -> None:
    messages = [
        {"role": "user", "content": "compare", "images": [RED, BLUE]},
        {"role": "assistant", "content": "they differ"},
        {"role": "user", "content": "and this?", "images": [RED]},
    ]
    text = [{k: v for k, v in m.items() if k != "images"} for m in messages]
    with_images = await run(await vision.generate(Request(messages=messages, template=TEMPLATE)))
    without = await run(await vision.generate(Request(messages=text, template=TEMPLATE)))
    assert with_images.finish == "length"
    # three images, each with its line break after the marker
    grown = with_images.usage["prompt_tokens"] - without.usage["prompt_tokens"]
    assert 3 * image_tokens() < grown <= 3 * image_tokens() + 3 * 2


async def test_bad_image_prompts_are_400s(vision: RunnerClient) -> None:
    with pytest.raises(InvalidRequest, match=r"2 image markers .* for 1 images") as e:
        await vision.generate(completion(f"a {MARKER} b ", RED))
    assert e.value.param == "prompt"
    messages = [{"role": "user", "content": f"see {MARKER}", "images": [RED]}]
    with pytest.raises(InvalidRequest, match="image markers") as e:
        await vision.generate(Request(messages=messages, template=TEMPLATE, param="messages"))
    assert e.value.param == "messages"
    tokens = Request(prompt=[Part("tokens", tokens=(1, 2)), Part("image", image=RED)])
    with pytest.raises(InvalidRequest, match="takes text, not token ids"):
        await vision.generate(tokens)
    assert (await run(await vision.generate(completion("still fine ", RED)))).finish == "length"


async def test_a_projector_that_does_not_fit_fails_the_load(
    tiny_path: Path, tmp_path: Path
) -> None:
    wrong = write_projector(tmp_path / "wide.gguf", 32)
    with pytest.raises(ModelLoadError, match="could not load the projector"):
        await load(tiny_path, wrong)


async def test_encoding_runs_beside_the_decode_loop(tiny_path: Path, slow_projector: Path) -> None:
    """A text stream keeps its pace while an image is encoded: the vision tower runs on the
    encoder thread, and only the (cheap) embedding decode joins the loop."""
    engine = await load(tiny_path, slow_projector, parallel=2)
    try:
        took = []  # an image request alone, twice (the machine may be busy)
        for colour in (RED, image((0, 255, 0))):
            t0 = time.monotonic()
            alone = await run(await engine.generate(completion("see ", colour, sampling=GREEDY)))
            took.append(time.monotonic() - t0)
        encode_s = sum(took) / len(took)
        stream = await engine.generate(
            completion("count", sampling=Sampling(temperature=0, max_tokens=2000, ignore_eos=True))
        )
        arrivals: list[float] = []

        async def read() -> None:
            async for batch in stream.deltas():
                arrivals.extend(time.monotonic() for d in batch if d.tokens)
                if len(arrivals) >= 5:
                    decoding.set()
                if len(arrivals) > 20 and image_done.is_set():
                    stream.cancel()
                    return

        image_done = asyncio.Event()
        decoding = asyncio.Event()
        reader = asyncio.create_task(read())
        await decoding.wait()  # the stream is decoding (its prefill may wait on a busy machine)
        start = time.monotonic()
        seen = await run(await engine.generate(completion("see ", BLUE, sampling=GREEDY)))
        end = time.monotonic()
        image_done.set()
        await reader
        assert alone.finish == seen.finish == "length"
        during = [t for t in arrivals if start <= t <= end]
        gaps = [b - a for a, b in itertools.pairwise(during)]
        assert len(during) > 5, (during, encode_s)
        # encoding on the loop would stop the stream for about as long as the image took alone
        assert max(gaps) < encode_s * 0.75, (max(gaps), encode_s)
    finally:
        await engine.close()


async def test_a_client_leaving_during_encoding_frees_the_slot(
    tiny_path: Path, slow_projector: Path
) -> None:
    engine = await load(tiny_path, slow_projector, parallel=1)
    try:
        for _ in range(3):
            gen = await engine.generate(completion("see ", RED))
            await asyncio.sleep(0.01)
            gen.cancel()
        text = await asyncio.wait_for(run(await engine.generate(completion("hello"))), 60)
        assert text.finish == "length"
        assert (await run(await engine.generate(completion("see ", BLUE)))).finish == "length"
    finally:
        await engine.close()


async def test_a_gemma3_projector_attends_over_the_image_both_ways(
    gemma3_path: Path, tmp_path: Path
) -> None:
    """Gemma 3's images are decoded with non-causal attention, whole, and wrapped in
    <start_of_image> ... <end_of_image> by libmtmd."""
    projector = write_projector(tmp_path / "gemma3.gguf", 640, kind="gemma3")
    engine = await load(gemma3_path, projector)
    try:
        sampling = Sampling(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
        # the same text with the tokens libmtmd wraps an image in, and no image between them
        wrapped = "Describe: <start_of_image><end_of_image> Answer:"
        text = await run(await engine.generate(completion(wrapped)))
        red = await run(
            await engine.generate(completion("Describe: ", RED, " Answer:", sampling=sampling))
        )
        again = await run(
            await engine.generate(completion("Describe: ", RED, " Answer:", sampling=sampling))
        )
        blue = await run(
            await engine.generate(completion("Describe: ", BLUE, " Answer:", sampling=sampling))
        )
        tokens = image_tokens(kind="gemma3")
        assert red.usage["prompt_tokens"] == text.usage["prompt_tokens"] + tokens
        assert red.logprobs == pytest.approx(again.logprobs, abs=1e-4)
        assert again.usage["cached_tokens"] == red.usage["prompt_tokens"] - 1
        assert red.logprobs[0] != pytest.approx(blue.logprobs[0], abs=1e-4)
    finally:
        await engine.close()
