"""The engine seam: what every engine offers the server, whatever kind of model it runs.

An engine is one loaded model (llama.cpp on a GGUF, a speech model, a toy plugin...). Handlers
translate their wire format into a `Request`, call `generate` and hand the `Generation` to the
stream pump (`server/pump.py`); they never reach into an engine's internals. The scheduler
(`engine/scheduler.py`) loads, keeps and unloads engines through the same protocol.

A request is request-level, not token-level: messages or prompt parts go in, and the engine
renders templates, tokenizes and samples as its kind requires. Operations only some engines
have (tokenizing for `/api/generate`'s `context` and `/v1/completions` echo) are optional
protocols, checked with `isinstance`.

Engines are found through plugins (`engine/plugins.py`); `ABI_VERSION` is what a plugin's
manifest must declare: it changes whenever this module changes incompatibly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from xllm._core import Delta

if TYPE_CHECKING:
    from xllm.grammar import Grammar
    from xllm.memory.planner import Plan
    from xllm.models.metadata import ModelInfo
    from xllm.models.modelfile import Modelfile

__all__ = [
    "ABI_VERSION",
    "Capability",
    "Delta",
    "Embedder",
    "Engine",
    "Generation",
    "Image",
    "ImageGeneration",
    "Loras",
    "Observer",
    "Painter",
    "Painting",
    "Part",
    "Relay",
    "Relayed",
    "Request",
    "Sampling",
    "Segment",
    "Speaker",
    "Speech",
    "TextEmbedder",
    "Tokenizer",
    "Transcriber",
    "Transcript",
    "Transcription",
    "Utterance",
    "Word",
]

ABI_VERSION = 1


class Capability(StrEnum):
    """What an engine can do with its model; `/api/show` and `/v1/models` list them."""

    COMPLETION = "completion"
    CHAT = "chat"
    EMBEDDING = "embedding"
    TOOLS = "tools"
    VISION = "vision"
    INSERT = "insert"
    THINKING = "thinking"
    TRANSCRIPTION = "transcription"
    SPEECH = "speech"
    IMAGE_GENERATION = "image_generation"


@dataclass(frozen=True, slots=True)
class Image:
    """An image of a prompt, decoded and checked by the server (`xllm/images.py`): engines
    never parse image files themselves."""

    width: int
    height: int
    rgb: bytes
    """width * height RGB triplets, row by row."""
    digest: str
    """sha256 (hex) of `f"{width}x{height}:"` and `rgb`: equal images are equal chunks for
    the prefix cache (the size is in it: a red 64x48 and a red 48x64 have the same bytes)."""


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a prompt: text, token ids (for engines that tokenize), an image or audio."""

    kind: Literal["text", "tokens", "image", "audio"]
    text: str = ""
    tokens: tuple[int, ...] = ()
    data: bytes = b""
    image: Image | None = None
    """A `kind="image"` part's image."""


SPECULATIVE = ("none", "ngram", "draft", "auto")
"""Kinds of speculation a request, a Modelfile or the server may ask for: none, prompt lookup,
the draft model loaded beside the model, or either (the draft model where there is one) only as
far as the measured step costs say it pays."""
MAX_DRAFT = 64
"""The longest draft a request may ask for (each draft token is a row of the decode)."""
MAX_LORAS = 8
"""LoRA adapters one request may apply together."""
LORA_SCALES = (0.0, 2.0)
"""The scales a request may give an adapter: 0 turns it off (a model's own adapter too); past
2 its delta outweighs the weights it was trained against."""
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""A LoRA adapter's name: `<name>.gguf` in the loras folder, or one of a model's own."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters, validated by the wire models; None leaves a knob to the defaults
    (the model's Modelfile, then the dialect's, then the engine's)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    """-1: the whole context."""
    seed: int | None = None
    """-1: a random one."""
    stop: tuple[str, ...] | None = None
    max_tokens: int | None = None
    """0: no limit but the context."""
    n: int = 1
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k likeliest."""
    logit_bias: Mapping[int, float] | None = None
    ignore_eos: bool | None = None
    grammar: Grammar | None = None
    speculative: str | None = None
    """How drafts are made: "ngram" (prompt lookup), "draft" (the draft model), "auto" (either,
    as far as it pays) or "none"."""
    draft_model: str | None = None
    """The draft model a request names (it must be the one the model was loaded with)."""
    draft_min_p: float | None = None
    """The least probability (by the draft model) of a draft token worth verifying."""
    draft_adaptive: bool | None = None
    """False: "draft" drafts up to `max_draft` every step whatever the costs say (as
    llama-server does), where by default its guesses are priced and a step that cannot pay
    drafts none."""
    max_draft: int | None = None
    """The most draft tokens a step verifies (0: no drafting, not even a `prediction`)."""
    prediction: str | None = None
    """The expected output (OpenAI's predicted outputs): drafted as the model goes."""
    lora: tuple[tuple[str, float], ...] | None = None
    """LoRA adapters by name, with their scales, over the model's own (its Modelfile ADAPTERs,
    at scale 1 unless named here; scale 0 turns one off)."""

    def over(self, defaults: Sampling) -> Sampling:
        """These parameters, with what they leave unset taken from `defaults`."""
        mine = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(defaults, **{k: v for k, v in mine.items() if v is not None})

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Sampling:
        """From a mapping of field names (others are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})


@dataclass(frozen=True)
class Request:
    """One generation request, in no API's terms.

    A chat has `messages` (OpenAI's shape: role, content, tool_calls...); a completion has
    `prompt` parts. `defaults` are the dialect's own sampling defaults (Ollama's temperature
    0.8...), below the model's Modelfile and above the engine's.
    """

    messages: Sequence[Mapping[str, Any]] | None = None
    prompt: Sequence[Part] = ()
    """A completion's prompt, as it is (no template); for a chat, images of the messages are
    in each message's `images` (a list of `Image`, in the order they were given)."""
    suffix: str | None = None
    """Fill-in-the-middle: the text after the gap (`insert` capability)."""
    sampling: Sampling = field(default_factory=Sampling)
    defaults: Sampling = field(default_factory=Sampling)
    tools: Sequence[Mapping[str, Any]] = ()
    """Function specs (name, description, parameters) the model may call."""
    forced_tool: str | None = None
    """A call the model must make: a function's name, or "" for any of `tools`."""
    parallel_tools: bool = True
    template: str | None = None
    """A request's own chat template (Jinja2, or Ollama's Go syntax)."""
    enable_thinking: bool | None = None
    split_thinking: bool = False
    """The client wants the reasoning apart from the answer: the generation then says whether
    its prompt opened the reasoning block (`opens_thinking`)."""
    context: Sequence[int] = ()
    """Tokens of an earlier exchange that go before the prompt (Ollama's `context`)."""
    param: str = "prompt"
    """The request field the prompt came from, for errors about it (`messages`, `prompt`)."""


class Observer(Protocol):
    """Told about finished generations and loads (the metrics)."""

    def observe_finish(self, model: str, finish: str, extra: Mapping[str, Any]) -> None: ...

    def observe_load(self, model: str, seconds: float) -> None: ...


@runtime_checkable
class Generation(Protocol):
    """A running request: its deltas until every choice has finished."""

    @property
    def n(self) -> int:
        """How many choices run (the request's `n`)."""

    @property
    def prompt_tokens(self) -> Sequence[int]:
        """The prompt as the model saw it, where the engine tokenizes (else empty)."""

    @property
    def opens_thinking(self) -> bool | None:
        """None when the model does not think; else whether the prompt itself opened the
        reasoning block (so generated text starts inside it)."""

    def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        """Batches of deltas (all that are ready) until every choice has finished. A delta with
        `finish` ends its choice (`choice` -1: every choice); `error` is set when it failed.
        Stops early, cancelling the generation, once `is_disconnected()` turns true."""

    def cancel(self) -> None:
        """Stop now and free what the generation holds; idempotent."""


@runtime_checkable
class Engine(Protocol):
    """One loaded model, as the server and the scheduler see it."""

    name: str
    """The model's name (`smollm2:135m`)."""
    key: str
    """The scheduler's key for this instance: `name`, then `name#2`... for replicas."""
    kind: str
    """The engine's manifest name (`llama.cpp`)."""
    info: ModelInfo
    ctx_size: int
    plan: Plan | None
    modelfile: Modelfile
    keep_alive: float
    """Seconds to stay loaded once idle (Ollama's keep_alive); negative = forever."""
    last_active: float
    on_exit: Callable[[Any], None] | None

    @property
    def capabilities(self) -> frozenset[Capability]: ...

    @property
    def pid(self) -> int | None:
        """The process the model runs in (None: in the server's own)."""

    @property
    def busy(self) -> bool: ...

    async def generate(self, request: Request) -> Generation:
        """Queue a request; errors about it (a 400 naming the field, a full queue's 503) are
        raised here, before anything streams."""

    def stats(self) -> dict[str, int | float]: ...

    def expires_at(self) -> float | None:
        """Wall-clock time this model unloads if nothing uses it; None = never."""

    def abort(self, reason: str) -> None:
        """End every running and queued request with a 503 `reason`; no new ones start."""

    async def close(self) -> None: ...


@runtime_checkable
class Tokenizer(Protocol):
    """An engine whose prompts are tokens the client may see and send."""

    async def tokenize(self, text: str, *, special: bool) -> list[int]: ...

    async def detokenize(self, tokens: Sequence[int]) -> str: ...


@runtime_checkable
class Loras(Protocol):
    """An engine whose requests may name LoRA adapters (`Sampling.lora`)."""

    def adapters(self) -> list[dict[str, Any]]:
        """The adapters loaded over the model: name, size (bytes) and whether it is one of the
        model's own."""

    def lora_files(self, names: Sequence[str]) -> list[tuple[str, int, int] | None]:
        """The files the adapters `names` stand for now, as (path, size, mtime), None for a
        name that stands for none: what the response cache keys on beside the names."""


@runtime_checkable
class Embedder(Protocol):
    """An engine with the `embedding` capability."""

    async def embed(self, inputs: list[list[int]], normalize: bool = True) -> list[list[float]]:
        """Pooled vectors of tokenized inputs."""


@dataclass(frozen=True, slots=True)
class Transcription:
    """A speech-to-text request, in no API's terms."""

    audio: bytes
    """The uploaded file as it came (any container PyAV decodes); the engine decodes it."""
    task: Literal["transcribe", "translate"] = "transcribe"
    """`translate`: the text in English, whatever was spoken."""
    language: str | None = None
    """The spoken language's code (`en`); None: detected."""
    prompt: str | None = None
    """Text that goes before the audio (spellings, the previous part of a recording)."""
    temperature: float | None = None
    """None or 0: greedy, raised step by step where decoding fails; else this temperature."""
    words: bool = False
    """Time each word too."""


@dataclass(frozen=True, slots=True)
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of speech as the model decoded it (OpenAI's verbose_json segment)."""

    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    """Where in the audio the decoding window began (in 10 ms frames)."""
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0
    words: tuple[Word, ...] = ()


@runtime_checkable
class Transcript(Protocol):
    """A running transcription: the audio's facts, then its segments as they are decoded."""

    @property
    def duration(self) -> float:
        """Seconds of audio (known once the file is decoded, before `transcribe` returns)."""

    @property
    def language(self) -> str:
        """The language spoken (given, or detected: known before the first segment)."""

    @property
    def language_probability(self) -> float: ...

    @property
    def seconds(self) -> float:
        """How long the engine worked on it, once every segment is out (for the real-time
        factor)."""

    def segments(self, is_disconnected: Callable[[], bool] | None = None) -> AsyncIterator[Segment]:
        """Segments in order until the audio ends; raises an XllmError if decoding fails.
        Stops early, cancelling the work, once `is_disconnected()` turns true."""

    def cancel(self) -> None:
        """Stop now; idempotent."""


@dataclass(frozen=True, slots=True)
class Speech:
    """A text-to-speech request, in no API's terms."""

    text: str
    voice: str | None = None
    """One of the engine's `voices`; None: its default."""
    speed: float = 1.0
    """How much faster than the voice's natural pace (0.5: half as fast)."""


@runtime_checkable
class Utterance(Protocol):
    """A running synthesis: mono signed 16-bit little-endian samples at `sample_rate`, a piece
    at a time as they are synthesized."""

    @property
    def sample_rate(self) -> int: ...

    @property
    def input_tokens(self) -> int:
        """What the engine reads the text as (phonemes for Piper), counted for `usage`."""

    @property
    def output_tokens(self) -> int:
        """What the engine made (decoder frames for Piper), once the audio has ended."""

    @property
    def seconds(self) -> float:
        """Time the engine spent synthesizing, once the audio has ended."""

    def audio(self, is_disconnected: Callable[[], bool] | None = None) -> AsyncIterator[bytes]:
        """Pieces of audio in order until the text is spoken; raises an XllmError if synthesis
        fails. Stops early, cancelling the work, once `is_disconnected()` turns true."""

    def cancel(self) -> None:
        """Stop now; idempotent."""


@runtime_checkable
class Transcriber(Protocol):
    """An engine with the `transcription` capability."""

    @property
    def languages(self) -> Sequence[str]:
        """The language codes the model knows (`["en"]` for an English-only model)."""

    async def transcribe(self, request: Transcription) -> Transcript:
        """Queue a transcription; errors about the request (audio that does not decode, a
        language the model lacks) are raised here, before anything streams."""


@runtime_checkable
class Speaker(Protocol):
    """An engine with the `speech` capability."""

    @property
    def voices(self) -> Sequence[str]:
        """The names `Speech.voice` may take, the default first."""

    async def speak(self, request: Speech) -> Utterance:
        """Queue a synthesis; errors about the request (a voice the model lacks, text with
        nothing to say) are raised here, before anything streams."""


@dataclass(frozen=True, slots=True)
class ImageGeneration:
    """A text-to-image request, in no API's terms (sizes already checked by the server)."""

    prompt: str
    width: int
    height: int
    """The size the client asked for; the engine returns exactly this size."""
    n: int = 1
    """Images made, each from its own seed (`seed`, `seed + 1`...)."""
    seed: int = 0
    negative_prompt: str = ""
    steps: int | None = None
    """None: the engine's default for the model."""
    cfg_scale: float | None = None
    sampler: str | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int | None = None
    """JPEG or WebP quality, 0-100 (OpenAI's `output_compression`); None: the encoder's."""


@runtime_checkable
class Painting(Protocol):
    """A running image generation: its images once every one is made, and its progress."""

    @property
    def seconds(self) -> float:
        """Time the engine spent, once the images are made."""

    async def images(self, is_disconnected: Callable[[], bool] | None = None) -> list[bytes]:
        """The images as files of the requested format, exactly the requested size, in seed
        order; raises an XllmError if generation fails. Stops early, cancelling the work, once
        `is_disconnected()` turns true (then the list is empty)."""

    def cancel(self) -> None:
        """Stop now; idempotent."""


@runtime_checkable
class Painter(Protocol):
    """An engine with the `image_generation` capability."""

    @property
    def samplers(self) -> Sequence[str]:
        """The names `ImageGeneration.sampler` may take."""

    def extra_memory(self, width: int, height: int) -> int:
        """Bytes of RAM an image of that size takes beyond the model's memory plan (0 when the
        plan holds it)."""

    async def paint(self, request: ImageGeneration) -> Painting:
        """Queue a generation; errors about the request are raised here, before any work."""


@runtime_checkable
class TextEmbedder(Protocol):
    """An engine that embeds texts itself (it tokenizes where it runs: a remote upstream)."""

    async def embed_texts(
        self, inputs: Sequence[str | Sequence[int]], *, normalize: bool
    ) -> tuple[list[list[float]], int]:
        """Vectors of the inputs (texts or token ids), and the tokens embedded."""


class Relayed(Protocol):
    """An answer a `Relay` engine is sending back, as it arrives."""

    content_type: str

    def chunks(self) -> AsyncIterator[bytes]:
        """Its bytes, in pieces as they come; a failure is raised as an XllmError."""

    def close(self, failed: bool = False) -> None:
        """Stop (the upstream sees the request cancelled) and free it; idempotent."""


@runtime_checkable
class Relay(Protocol):
    """An engine that takes OpenAI's requests as they are (an OpenAI-compatible upstream):
    the OpenAI dialect relays chat and text completions and embeddings to it, body and answer
    untranslated, instead of going through `generate`."""

    async def relay(self, path: str, body: Mapping[str, Any]) -> Relayed:
        """Send the body (an OpenAI request to `path`, `/v1/chat/completions`...); the
        upstream's refusal is raised here, before anything streams."""
