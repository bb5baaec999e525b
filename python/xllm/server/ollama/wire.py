"""Wire models of Ollama's API, with Ollama's field names; validated once, here."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from xllm import grammar
from xllm.engine.protocol import MAX_DRAFT, Image, Sampling
from xllm.images import Source
from xllm.server.openai.wire import (
    MAX_SEED,
    MAX_STOP_LEN,
    MAX_STOPS,
    EngineName,
    LoraList,
    Tool,
    lora_set,
)

log = logging.getLogger("xllm.server")


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


StopList = Annotated[
    list[Annotated[str, Field(max_length=MAX_STOP_LEN)]], Field(max_length=MAX_STOPS)
]


Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
_MAX_NAMED = 10
"""Unknown option names a warning lists (the rest are counted)."""


class Options(Wire):
    """Ollama's `options`, every name it knows or knew, type-checked and range-checked; knobs
    llama.cpp here has no use for (GPU placement, mirostat, threads, the RoPE and GQA settings
    models now carry) are accepted and ignored, as newer Ollama does. Other names are logged
    and ignored, as Ollama's `invalid option provided` warning does."""

    num_ctx: Annotated[int, Field(ge=2, le=2**31 - 1)] | None = None
    """A sequence holds at least a prompt token and a generated one (the engine refuses less)."""
    num_predict: Annotated[int, Field(ge=-2, le=2**31 - 1)] | None = None
    num_keep: Annotated[int, Field(ge=-1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    typical_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED)] | None = None
    stop: StopList | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1, le=2**20)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    penalize_newline: bool | None = None
    mirostat: Annotated[int, Field(ge=0, le=2)] | None = None
    mirostat_tau: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    mirostat_eta: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    tfs_z: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    num_batch: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    num_gpu: Int32 | None = None
    main_gpu: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    num_thread: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    num_gqa: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    rope_frequency_base: Annotated[float, Field(gt=0.0, le=1e12)] | None = None
    rope_frequency_scale: Annotated[float, Field(gt=0.0, le=100.0)] | None = None
    draft_num_predict: Annotated[int, Field(ge=0, le=MAX_DRAFT)] | None = None
    """Ollama's name for `max_draft`."""
    speculative: Literal["ngram", "draft", "auto", "none"] | None = None
    """xllm's: "ngram" drafts tokens by prompt lookup, "draft" with the draft model loaded
    beside the model, "auto" either as far as it pays (see the README)."""
    max_draft: Annotated[int, Field(ge=0, le=MAX_DRAFT)] | None = None
    draft_model: Annotated[str, Field(min_length=1, max_length=400)] | None = None
    """xllm's: the draft model a "draft" request expects (the one loaded beside the model)."""
    draft_adaptive: bool | None = None
    """xllm's: false, "draft" drafts up to `max_draft` every step whatever the costs say."""
    lora: LoraList | None = None
    """xllm's: LoRA adapters to apply, `[{"name", "scale"}]` (see the README)."""
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    numa: bool | None = None
    embedding_only: bool | None = None

    @field_validator("lora")
    @classmethod
    def _unique(cls, v: list[Any] | None) -> list[Any] | None:
        lora_set(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                names = ", ".join(repr(k[:80]) for k in unknown[:_MAX_NAMED])
                more = f" and {len(unknown) - _MAX_NAMED} more" if len(unknown) > _MAX_NAMED else ""
                log.warning("invalid option provided: %s%s (ignored)", names, more)
        return data

    def sampling(self) -> Sampling:
        """The options generation uses, as sampling parameters (`num_predict` <= 0, no limit,
        and `seed` -1, a random one, override a Modelfile's limit and seed)."""
        o = self.model_dump(exclude_none=True, include=_ENGINE_OPTIONS)
        predict = o.pop("num_predict", None)
        if predict is not None:
            o["max_tokens"] = max(predict, 0)
        if "stop" in o:
            o["stop"] = tuple(o["stop"])
        draft = o.pop("draft_num_predict", None)
        o.setdefault("max_draft", draft)
        o["lora"] = lora_set(self.lora)
        return Sampling.of(o)


_ENGINE_OPTIONS = {
    "num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop", "repeat_penalty",
    "repeat_last_n", "presence_penalty", "frequency_penalty", "speculative", "max_draft",
    "draft_num_predict", "draft_model", "draft_adaptive",
}  # fmt: skip


KeepAlive = str | int | float


def keep_alive_seconds(value: KeepAlive | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1")."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _forever_if_huge(float(value))
    text = str(value).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return _forever_if_huge(float(text))
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    sign = -1.0 if text.startswith("-") else 1.0
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("-"):
        raise ValueError(f"keep_alive: invalid duration {value!r}")
    return _forever_if_huge(sign * sum(float(n) * units[u] for n, u in parts))


_MAX_KEEP_ALIVE_S = 100 * 365 * 86400


def _forever_if_huge(seconds: float) -> float:
    """Past a century (beyond what a timestamp can say, for the largest), it means forever."""
    return -1.0 if seconds > _MAX_KEEP_ALIVE_S else seconds


class _WithKeepAlive(Wire):
    keep_alive: KeepAlive | None = None
    engine: EngineName | None = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, v: KeepAlive | None) -> KeepAlive | None:
        keep_alive_seconds(v)
        return v


class _Inference(_WithKeepAlive):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    cache: bool = True
    """False: neither answered from nor stored in the temperature-0 response cache."""
    stream: bool = True
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: Options | None = None
    think: bool | Literal["high", "medium", "low"] | None = None

    @field_validator("format")
    @classmethod
    def _satisfiable(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, dict):  # checked past the union, whose other branch would be blamed
            grammar.check_schema(v)
        return v


class ToolFunctionCall(Wire):
    name: Annotated[str, Field(min_length=1)]
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = None


class ToolCall(Wire):
    function: ToolFunctionCall


class Message(Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None

    def for_template(self, images: list[Image]) -> dict[str, Any]:
        """The message as chat templates (and the tools prompt) expect it, with its images
        decoded."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in self.tool_calls
            ]
        if self.tool_name:
            out["name"] = self.tool_name
        if images:
            out["images"] = images
        return out


class GenerateRequest(_Inference):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[Annotated[int, Field(ge=0)]] | None = None
    raw: bool = False
    images: list[str] | None = None

    def image_sources(self) -> list[Source]:
        return [Source(f"images[{j}]", x) for j, x in enumerate(self.images or ())]


class ChatRequest(_Inference):
    messages: list[Message] = Field(default_factory=list)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    template: str | None = None
    """Not in Ollama's chat API (which would ignore it): as /api/generate's `template`, this
    request's chat template in place of the model's; empty means the model's."""

    def functions(self) -> list[dict[str, Any]]:
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    def image_sources(self) -> list[list[Source]]:
        """Each message's images, named by their field."""
        return [
            [Source(f"messages[{i}].images[{j}]", x) for j, x in enumerate(m.images or ())]
            for i, m in enumerate(self.messages)
        ]

    def template_messages(self, images: list[Image]) -> list[dict[str, Any]]:
        """The messages for the template, each with its share of `images` (decoded from
        `image_sources`, in order)."""
        decoded = iter(images)
        return [m.for_template([next(decoded) for _ in m.images or ()]) for m in self.messages]


class EmbedRequest(_WithKeepAlive):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    input: str | list[str] = ""
    truncate: bool = True
    options: Options | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None


class EmbeddingsRequest(_WithKeepAlive):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    prompt: str = ""
    options: Options | None = None


class ShowRequest(Wire):
    model: Annotated[str, Field(max_length=400)] = ""
    name: Annotated[str, Field(max_length=400)] = ""  # older clients
    verbose: bool = False

    def target(self) -> str:
        return self.model or self.name
