"""Wire models of the OpenAI dialect: every request field is validated here, once.

Bodies are parsed in pydantic's strict JSON mode: wrong types, out-of-range numbers, NaN and
infinities are 400s naming the field, never a crash further in.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from xllm import grammar
from xllm.engine.protocol import LORA_NAME, LORA_SCALES, MAX_DRAFT, MAX_LORAS, Sampling
from xllm.images import Source

MAX_STOPS = 32
MAX_STOP_LEN = 512
MAX_N = 16
MAX_SEED = 2**63 - 1


EngineName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]
"""The request field `engine`: the engine that must serve the model, where several can."""


class Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Wire):
    include_usage: bool = False


class TextPart(Wire):
    type: Literal["text"]
    text: str


class ImageURL(Wire):
    url: str
    detail: str | None = None


class ImagePart(Wire):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(Wire):
    name: str
    arguments: str


class ToolCall(Wire):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or [] if isinstance(p, TextPart))

    def image_sources(self, index: int) -> list[Source]:
        """The message's images as the client gave them (data: URIs, base64 or URLs), named
        by their field; `index` is the message's."""
        if not isinstance(self.content, list):
            return []
        return [
            Source(f"messages[{index}].content[{j}].image_url", p.image_url.url)
            for j, p in enumerate(self.content)
            if isinstance(p, ImagePart)
        ]


class Speculative(Wire):
    """`speculative` (an xllm extension): how this request drafts tokens to verify."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    type: Literal["ngram", "none", "draft", "auto"]
    max_draft: Annotated[int, Field(ge=0, le=MAX_DRAFT)] | None = None
    draft_model: Annotated[str, Field(min_length=1, max_length=400)] | None = None
    """The draft model (type "draft"): the one the model was loaded with, by its name."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Type "draft": draft tokens the draft model finds less likely end the draft."""
    adaptive: bool | None = None
    """Type "draft", false: draft up to `max_draft` every step whatever the costs say."""

    @model_validator(mode="after")
    def _draft_fields(self) -> Speculative:
        drafts = self.type in ("draft", "auto")
        if not drafts and (self.draft_model is not None or self.min_p is not None):
            raise ValueError('draft_model and min_p go with type "draft" or "auto"')
        if self.adaptive is not None and self.type != "draft":
            raise ValueError('adaptive goes with type "draft"')
        return self


LoraName = Annotated[str, Field(pattern=LORA_NAME)]
LoraScale = Annotated[float, Field(ge=LORA_SCALES[0], le=LORA_SCALES[1])]


class Lora(Wire):
    """One LoRA adapter a request applies (`lora`, an xllm extension): its name and scale."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    name: LoraName
    scale: LoraScale = 1.0


LoraList = Annotated[list[Lora], Field(max_length=MAX_LORAS)]


def lora_set(loras: list[Lora] | None) -> tuple[tuple[str, float], ...] | None:
    """A request's adapters as `Sampling.lora`; ValueError when one is named twice."""
    if loras is None:
        return None
    names = [x.name for x in loras]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"adapter {twice!r} is named twice")
    return tuple((x.name, float(x.scale)) for x in loras)


class Prediction(Wire):
    """OpenAI's predicted output: text the answer is expected to repeat in large part."""

    type: Literal["content"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class LoraFields(Wire):
    """`lora` and `scale` (xllm extensions), as chat, completions and responses take them."""

    lora: LoraName | LoraList | None = None
    """LoRA adapters to apply: `[{"name", "scale"}]`, or one name with `scale` beside it."""
    scale: LoraScale | None = None
    """The scale of a `lora` given as one name (default 1)."""

    @field_validator("lora")
    @classmethod
    def _unique(cls, v: str | list[Lora] | None) -> str | list[Lora] | None:
        if isinstance(v, list):
            lora_set(v)
        return v

    @field_validator("scale")
    @classmethod
    def _with_a_name(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not isinstance(info.data.get("lora"), str):
            raise ValueError("scale goes with lora given as one adapter's name")
        return v

    def loras(self) -> tuple[tuple[str, float], ...] | None:
        if isinstance(self.lora, str):
            return ((self.lora, 1.0 if self.scale is None else float(self.scale)),)
        return lora_set(self.lora)


class SamplingFields(LoraFields):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Field(min_length=1, max_length=400)]
    engine: EngineName | None = None
    cache: bool = True
    """False: neither answered from nor stored in the temperature-0 response cache."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=0, le=2**20)] | None = None
    ignore_eos: bool = False
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    speculative: Speculative | None = None
    prediction: Prediction | None = None

    @field_validator("stop")
    @classmethod
    def _stop_lengths(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else v or []:
            if len(s) > MAX_STOP_LEN:
                raise ValueError(f"stop strings are limited to {MAX_STOP_LEN} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.isdigit() or len(key) > 10:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self, **fields: Any) -> Sampling:
        """The request's sampling parameters; `fields` are those an endpoint names otherwise."""
        return Sampling.of(
            {
                **self.model_dump(exclude_none=True, include=_SAMPLING),
                "stop": tuple(self.stop_list()) or None,
                "logit_bias": {int(k): v for k, v in self.logit_bias.items()}
                if self.logit_bias
                else None,
                "speculative": self.speculative.type if self.speculative else None,
                "max_draft": self.speculative.max_draft if self.speculative else None,
                "draft_model": self.speculative.draft_model if self.speculative else None,
                "draft_min_p": self.speculative.min_p if self.speculative else None,
                "draft_adaptive": self.speculative.adaptive if self.speculative else None,
                "prediction": self.prediction.text() if self.prediction else None,
                "lora": self.loras(),
                **fields,
            }
        )


_SAMPLING = {
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repeat_penalty", "repeat_last_n", "ignore_eos", "n",
}  # fmt: skip


JSONSchema = Annotated[dict[str, Any], AfterValidator(grammar.checked_schema)]
"""A JSON schema some value can satisfy (an empty `enum` or `anyOf` is a 400 naming it)."""


class JSONSchemaFormat(Wire):
    name: Annotated[str, Field(min_length=1, max_length=64)] = "response"
    schema_: JSONSchema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self

    def grammar_format(self) -> str | dict[str, Any] | None:
        """What serving.grammar_for takes: "json", a schema, or None for plain text."""
        if self.type == "json_object":
            return "json"
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_ or "json"
        return None


class FunctionDef(Wire):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: JSONSchema | None = None
    strict: bool | None = None


class Tool(Wire):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Wire):
    name: str


class NamedToolChoice(Wire):
    type: Literal["function"]
    function: FunctionName


class ChatTemplateKwargs(Wire):
    """The template variables a request may set; anything else is refused (templates are code
    from model files, and their inputs stay allow-listed)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    enable_thinking: bool | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None
    """As llama-server's: a thinking model's reasoning goes to `reasoning_content`, unless
    "none" leaves it in `content`."""
    chat_template_kwargs: ChatTemplateKwargs | None = None
    chat_template: str | None = None
    """vLLM's and llama-server's: this request's chat template (Jinja2, or Ollama's Go syntax)
    in place of the model's; empty means the model's."""

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        names = {t.function.name for t in self.tools or []}
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: function {self.tool_choice.function.name!r} is not in tools"
                )
        elif self.tool_choice == "required" and not names:
            raise ValueError("tool_choice: required needs tools")
        if self.forced_function() is not None and self.response_format is not None:
            raise ValueError("a forced tool call and response_format cannot be combined")
        return self

    def functions(self) -> list[dict[str, Any]]:
        """The callable functions (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.function.model_dump(exclude_none=True) for t in self.tools]

    def enable_thinking(self) -> bool | None:
        kwargs = self.chat_template_kwargs
        return kwargs.enable_thinking if kwargs is not None else None

    def forced_function(self) -> str | None:
        """ "" when some call is required, a name when one is, None when the model decides."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "" if self.tool_choice == "required" else None


class CompletionRequest(SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=64)]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    """Text after the gap: fill-in-the-middle, for models with the "insert" capability."""


class EmbeddingRequest(Wire):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    engine: EngineName | None = None
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None
    lora: Any = None
    """Refused when given (xllm/embedding.py `refuse_lora`), never silently ignored."""


def error_param(loc: tuple[int | str, ...]) -> str:
    """`('messages', 0, 'content')` -> `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = part
        elif (
            "[" in part
            or part in ("str", "list[str]", "list[int]")
            or part.startswith(("list[", "constrained-", "function-"))
        ):
            continue  # pydantic's names for union branches, not fields
        else:
            out += f".{part}"
    return out
