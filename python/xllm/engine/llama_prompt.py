"""How the llama.cpp engine turns a `Request` into prompt tokens and sampling parameters.

Chat templates, tools, fill-in-the-middle, token prompts, the Modelfile's defaults and the
checks that depend on the model (context room, vocabulary, parallel sequences) all live here:
they are this engine's business, not the handlers'. Rendering and tokenizing run in the
model's runner process (`RunnerClient.chat_prompt`, `tokenize`).

Images (vision models, which have a projector) become image markers in the text: before the
content of the message they came with, or where their part is in a completion's prompt. The
runner tokenizes the text with libmtmd, which replaces each marker with the image's tokens,
and the prompt goes to the Rust loop with -1 at those positions and each image's span.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from xllm import grammar, reasoning, tools
from xllm.engine.protocol import MAX_DRAFT, Capability, Image, Request, Sampling
from xllm.errors import InvalidRequest
from xllm.models import gotemplate, names
from xllm.models.modelfile import Modelfile, is_go_template

if TYPE_CHECKING:
    from xllm.engine.llama import RunnerClient


@dataclass(frozen=True)
class Prepared:
    """A request as the Rust loop takes it."""

    tokens: list[int]
    """-1 at each image token."""
    params: dict[str, Any]
    opens_thinking: bool | None
    images: list[tuple[int, int, Image]]
    """Each image of the prompt: (start, length in tokens, the image)."""


_FEATURES = {
    Capability.COMPLETION: "generate",
    Capability.EMBEDDING: "embeddings",
    Capability.INSERT: "insert",
    Capability.VISION: "images",
    Capability.THINKING: "thinking",
}


def require(
    capabilities: frozenset[Capability], name: str, capability: Capability, param: str | None
) -> None:
    """A 400 when the model lacks a capability (as Ollama words it: "does not support X")."""
    if capability not in capabilities:
        feature = _FEATURES.get(capability, capability.value)
        message = f"model {name!r} does not support {feature}"
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param)


def modelfile_defaults(modelfile: Modelfile) -> Sampling:
    """A stored model's Modelfile PARAMETERs as sampling defaults: the one place they become
    request defaults, for every dialect."""
    p = modelfile.parameters
    values = {k: p[k] for k in _SAMPLING if k in p}
    if isinstance(p.get("num_predict"), int) and p["num_predict"] > 0:
        values["max_tokens"] = p["num_predict"]
    if values.get("seed") == -1:
        del values["seed"]
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    if "draft_num_predict" in p:
        values["max_draft"] = min(p["draft_num_predict"], MAX_DRAFT)
    return Sampling.of(values)


_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "repeat_last_n", "seed", "stop", "speculative",
)  # fmt: skip


async def prepare(model: RunnerClient, request: Request) -> Prepared:
    """Prompt tokens and engine parameters for `request`; 400s name the field at fault."""
    caps = model.capabilities
    name = model.name
    require(caps, name, Capability.COMPLETION, None)
    _check_images(caps, name, request)
    sampling = request.sampling
    _check_draft(model, sampling)
    stops: list[str] = []
    images: list[tuple[int, int, Image]] = []
    if request.suffix is not None:
        tokens = await _infill(model, request)
    elif request.messages is not None:
        tokens, stops, constraint, images = await _chat(model, request)
        if constraint is not None:
            sampling = replace(sampling, grammar=constraint)
    else:
        tokens, images = await _raw(model, request)
    tokens = [*request.context, *tokens]
    if request.context:
        model.info.check_tokens(request.context, "context")
        images = [(start + len(request.context), n, im) for start, n, im in images]
    sampling = sampling.over(modelfile_defaults(model.modelfile)).over(request.defaults)
    params = sampling_params(model, sampling, len(tokens), stops, request.param)
    adapters = await model.adapter_set(sampling.lora)
    if adapters:
        params["lora"] = adapters
    if sampling.prediction and sampling.max_draft != 0:
        predicted = await model.tokenize(sampling.prediction, special=False)
        params["prediction"] = predicted[: model.ctx_size]
    opens = None
    if Capability.THINKING in caps and request.split_thinking:
        tail = await model.detokenize(tokens[-4:])  # templates may open the block themselves
        opens = tail.rstrip().endswith(reasoning.OPEN)
    return Prepared(tokens, params, opens, images)


def _check_draft(model: RunnerClient, s: Sampling) -> None:
    """A request may draft only with the draft model its model was loaded with (a Modelfile or
    server default of "draft" on a model without one just does not draft)."""
    draft = model.options.draft_model if model.options.draft_path is not None else None
    if s.speculative == "draft" and draft is None:
        raise InvalidRequest(
            f"speculative: model {model.name!r} was loaded without a draft model (see "
            "--draft-model, models.draft_model in config.yaml, PARAMETER draft_model)",
            param="speculative",
        )
    if s.draft_model is not None and not names.same_model(s.draft_model, draft or ""):
        loaded = f"with {draft!r}" if draft is not None else "without one"
        raise InvalidRequest(
            f"speculative.draft_model: model {model.name!r} drafts only with the draft model it "
            f"was loaded with, and it was loaded {loaded}",
            param="speculative.draft_model",
        )


def _check_images(caps: frozenset[Capability], name: str, request: Request) -> None:
    """Images go only to vision models."""
    in_prompt = any(p.kind == "image" for p in request.prompt)
    in_messages = any(m.get("images") for m in request.messages or ())
    if in_prompt or in_messages:
        # a chat's images are in its messages; a completion's in its own field
        param = "messages" if request.param == "messages" else "images"
        require(caps, name, Capability.VISION, param)
        if request.suffix is not None:
            raise InvalidRequest("suffix: fill-in-the-middle takes no images", param="suffix")


def _spans(
    spans: Sequence[tuple[int, int]], images: Sequence[Image]
) -> list[tuple[int, int, Image]]:
    return [(start, n, image) for (start, n), image in zip(spans, images, strict=True)]


async def _raw(
    model: RunnerClient, request: Request
) -> tuple[list[int], list[tuple[int, int, Image]]]:
    """A prompt of parts, as it is: text tokenized with its special tokens, token ids checked;
    with images, text and image markers tokenized together."""
    if any(p.kind == "image" for p in request.prompt):
        return await _raw_images(model, request)
    tokens: list[int] = []
    for part in request.prompt:
        if part.kind == "tokens":
            model.info.check_tokens(part.tokens, request.param)
            tokens += part.tokens
        elif part.kind == "text":
            tokens += await model.tokenize(part.text, special=True)
    return tokens, []


async def _raw_images(
    model: RunnerClient, request: Request
) -> tuple[list[int], list[tuple[int, int, Image]]]:
    if any(p.kind == "tokens" for p in request.prompt):
        raise InvalidRequest(
            f"{request.param}: a prompt with images takes text, not token ids",
            param=request.param,
        )
    marker = model.info.image_marker or ""
    images = [p.image for p in request.prompt if p.image is not None]
    text = "".join(marker if p.image is not None else p.text for p in request.prompt)
    tokens, spans = await model.tokenize_media(text, images, request.param)
    return tokens, _spans(spans, images)


def with_images(
    messages: Sequence[Mapping[str, Any]], marker: str
) -> tuple[list[dict[str, Any]], list[Image]]:
    """Messages whose images became markers before their text (as Ollama places them), and
    the images in order."""
    out: list[dict[str, Any]] = []
    images: list[Image] = []
    for m in messages:
        m = dict(m)
        attached = m.pop("images", None) or []
        if attached:
            images += attached
            text = m.get("content") or ""
            m["content"] = "".join(f"{marker}\n" for _ in attached) + text
        out.append(m)
    return out, images


async def _infill(model: RunnerClient, request: Request) -> list[int]:
    """Fill-in-the-middle: the text before and after the gap around the model's FIM tokens."""
    require(model.capabilities, model.name, Capability.INSERT, "suffix")
    if any(p.kind != "text" for p in request.prompt):
        raise InvalidRequest("suffix needs a text prompt, not token ids", param="suffix")
    assert model.info.fim_tokens is not None  # what "insert" means
    pre, suf, mid = model.info.fim_tokens
    prefix = "".join(p.text for p in request.prompt)
    bos = await model.tokenize("", special=True)  # BOS where the vocabulary wants one
    head = await model.tokenize(prefix, special=False)
    tail = await model.tokenize(request.suffix or "", special=False)
    return [*bos, pre, *head, suf, *tail, mid]


def jinja(template: str | None) -> str | None:
    """A request's template as Jinja2: Ollama's Go syntax is translated (GoTemplateError: a
    400 naming the construct)."""
    if template is not None and is_go_template(template):
        return gotemplate.to_jinja(template)
    return template


def with_modelfile(
    modelfile: Modelfile, messages: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A stored model's Modelfile SYSTEM (unless the request has a system message) and
    MESSAGEs go before the request's messages, as in Ollama."""
    out = [{"role": m.role, "content": m.content} for m in modelfile.messages]
    out += [dict(m) for m in messages]
    if modelfile.system and not any(m.get("role") == "system" for m in messages):
        out.insert(0, {"role": "system", "content": modelfile.system})
    return out


async def _chat(
    model: RunnerClient, request: Request
) -> tuple[list[int], list[str], grammar.Grammar | None, list[tuple[int, int, Image]]]:
    """(tokens, the template's extra stops, a forced call's grammar, the images' spans) for a
    chat.

    A template that knows tools gets them; otherwise a system message describes them. A forced
    call (`forced_tool` "" = any function, or a name) constrains decoding with a grammar.
    OpenAI's `developer` messages are what templates know as `system` ones.
    """
    assert request.messages is not None
    messages, images = with_images(request.messages, model.info.image_marker or "")
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    template = jinja(request.template)
    source = (template if template is not None else model.info.chat_template) or ""
    functions = list(request.tools)
    template_tools = None
    if functions:
        if "tools" in source:
            template_tools = [{"type": "function", "function": dict(f)} for f in functions]
        else:
            messages = [{"role": "system", "content": tools.system_prompt(functions)}, *messages]
    if template_tools is None:
        messages = [tools.as_text(m) for m in messages]
    constraint = None
    if request.forced_tool is not None:
        # the template's own call format when it has one (tags), else the JSON we asked for
        tagged = template_tools is not None and tools.TAG_OPEN in source
        call = tools.call_grammar(
            functions, request.forced_tool or None, request.parallel_tools, tagged
        )
        constraint = grammar.Grammar(call, "tools")
    tokens, stops, spans = await model.chat_prompt(
        with_modelfile(model.modelfile, tools.template_messages(messages)),
        template_tools,
        template,
        request.enable_thinking,
        images,
    )
    return tokens, stops, constraint, _spans(spans, images)


def sampling_params(
    model: RunnerClient, s: Sampling, prompt_len: int, extra_stops: Sequence[str], param: str
) -> dict[str, Any]:
    """The Rust loop's parameters; checks what depends on the model."""
    if prompt_len == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    room = model.ctx_size - prompt_len
    if room < 1:
        raise InvalidRequest(
            f"the prompt is {prompt_len} tokens, which exceeds the context length of "
            f"{model.ctx_size} tokens",
            param=param,
        )
    params: dict[str, Any] = {
        k: getattr(s, k)
        for k in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "ignore_eos", "n", "logprobs", "grammar",
        )
        if getattr(s, k) is not None
    }  # fmt: skip
    if s.repeat_last_n is not None:  # -1: the whole context (Ollama's meaning)
        params["repeat_last_n"] = model.ctx_size if s.repeat_last_n == -1 else s.repeat_last_n
    if s.seed is not None and s.seed != -1:
        params["seed"] = int(s.seed) & 0xFFFFFFFF
    if model.options.max_tokens:  # the server's cap (`--max-tokens`)
        room = min(room, model.options.max_tokens)
    params["max_tokens"] = min(int(s.max_tokens), room) if s.max_tokens else room
    params["stop"] = [*(s.stop or ()), *extra_stops]
    if s.n > model.options.parallel:
        raise InvalidRequest(
            f"n={s.n} exceeds the {model.options.parallel} parallel sequences of this model",
            param="n",
        )
    if s.logit_bias:
        n_vocab = model.info.n_vocab
        bad = [t for t in s.logit_bias if t >= n_vocab]
        if bad:
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is out of range (vocabulary size {n_vocab})",
                param="logit_bias",
            )
        params["logit_bias"] = dict(s.logit_bias)
    if s.grammar is not None:
        params["grammar"] = s.grammar
    # the request's (or Modelfile's) choice, else the server's for this model
    mode = s.speculative or model.options.speculative
    params["ngram"] = mode in ("ngram", "auto")
    params["draft_model"] = mode in ("draft", "auto") and model.options.draft_path is not None
    params["auto"] = mode == "auto"
    if s.draft_min_p is not None:
        params["draft_min_p"] = s.draft_min_p
    if s.draft_adaptive is not None:
        params["adaptive"] = s.draft_adaptive
    if s.max_draft is not None:
        params["max_draft"] = s.max_draft
    return params
