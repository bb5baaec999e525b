"""The serving layer both API dialects share: prompts and sampling parameters.

Handlers translate their wire format into these calls; nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xllm import grammar, reasoning, tools
from xllm.engine.llama import LlamaModel
from xllm.errors import InvalidRequest
from xllm.models import gotemplate
from xllm.models.modelfile import is_go_template


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stops: list[str]
    """Stop strings the prompt format needs on top of the request's own."""


async def chat_prompt(
    model: LlamaModel,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    template: str | None = None,
    enable_thinking: bool | None = None,
) -> Prompt:
    """Render messages with the model's own template (ChatML when it has none), or with a
    request's `template` (Jinja2, or Ollama's Go syntax translated), and tokenize.

    Rendering runs in the runner's render worker under time and memory limits: templates are
    code from model files and requests.
    """
    tokens, stops = await model.chat_prompt(
        with_modelfile(model, messages),
        [dict(t) for t in tools] if tools else None,
        _jinja(template),
        enable_thinking,
    )
    return Prompt(tokens, stops)


def _jinja(template: str | None) -> str | None:
    """A request's template as Jinja2: Ollama's Go syntax is translated (GoTemplateError: a
    400 naming the construct)."""
    if template is not None and is_go_template(template):
        return gotemplate.to_jinja(template)
    return template


def with_modelfile(
    model: LlamaModel, messages: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A stored model's Modelfile SYSTEM (unless the request has a system message) and
    MESSAGEs go before the request's messages, as in Ollama."""
    mf = model.modelfile
    out = [{"role": m.role, "content": m.content} for m in mf.messages]
    out += [dict(m) for m in messages]
    if mf.system and not any(m.get("role") == "system" for m in messages):
        out.insert(0, {"role": "system", "content": mf.system})
    return out


def modelfile_fields(model: LlamaModel) -> dict[str, Any]:
    """A stored model's Modelfile PARAMETERs as request fields (its requests' defaults)."""
    p = model.modelfile.parameters
    fields = {k: p[k] for k in _SAMPLING if k in p}
    if p.get("num_predict", 0) > 0:
        fields["max_tokens"] = p["num_predict"]
    if fields.get("seed") == -1:
        del fields["seed"]
    if fields.get("repeat_last_n") == -1:
        fields["repeat_last_n"] = model.ctx_size
    return fields


_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "repeat_last_n", "seed", "stop",
)  # fmt: skip


_FEATURES = {
    "completion": "generate",
    "embedding": "embeddings",
    "insert": "insert",
    "vision": "images",
    "thinking": "thinking",
}


def require(model: LlamaModel, name: str, capability: str, param: str | None = None) -> None:
    """A 400 when the model lacks a capability (as Ollama words it: "does not support X")."""
    if capability not in model.info.capabilities:
        message = f"model {name!r} does not support {_FEATURES[capability]}"
        raise InvalidRequest(f"{param}: {message}" if param else message, param=param)


def check_token_ids(model: LlamaModel, tokens: Sequence[int], param: str) -> None:
    """Token ids given by a client must be in the model's vocabulary."""
    n_vocab = model.info.n_vocab
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(
            f"{param}: token id {bad} is outside the vocabulary (0..{n_vocab})", param=param
        )


def check_images(model: LlamaModel, name: str, has_images: bool, param: str) -> None:
    """Images go only to vision models; image input itself comes with the vision engine."""
    if has_images:
        require(model, name, "vision", param)
        raise InvalidRequest("image input is not available yet in this xllm", param=param)


async def infill_prompt(model: LlamaModel, name: str, prefix: str, suffix: str) -> Prompt:
    """Fill-in-the-middle: the text before and after the gap around the model's FIM tokens."""
    require(model, name, "insert", param="suffix")
    assert model.info.fim_tokens is not None  # what "insert" means
    pre, suf, mid = model.info.fim_tokens
    bos = await model.tokenize("", special=True)  # BOS where the vocabulary wants one
    head = await model.tokenize(prefix, special=False)
    tail = await model.tokenize(suffix, special=False)
    return Prompt([*bos, pre, *head, suf, *tail, mid], [])


async def prepare_chat(
    model: LlamaModel,
    messages: list[dict[str, Any]],
    fields: dict[str, Any],
    functions: Sequence[Mapping[str, Any]] = (),
    forced: str | None = None,
    parallel: bool = True,
    enable_thinking: bool | None = None,
    template: str | None = None,
) -> tuple[Prompt, dict[str, Any]]:
    """Prompt and engine parameters for a chat, tools included; `template`, a request's own,
    replaces the model's chat template as in `chat_prompt`.

    A template that knows tools gets them; otherwise a system message describes them. A forced
    call (`forced` "" = any function, or a name) constrains decoding with a grammar. OpenAI's
    `developer` messages are what templates know as `system` ones.
    """
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]
    source = (_jinja(template) if template is not None else model.info.chat_template) or ""
    template_tools = None
    if functions:
        if "tools" in source:
            template_tools = [{"type": "function", "function": f} for f in functions]
        else:
            messages = [{"role": "system", "content": tools.system_prompt(functions)}, *messages]
    if template_tools is None:
        messages = [tools.as_text(m) for m in messages]
    if forced is not None:
        # the template's own call format when it has one (tags), else the JSON we asked for
        tagged = template_tools is not None and tools.TAG_OPEN in source
        call = tools.call_grammar(functions, forced or None, parallel, tagged)
        fields = {**fields, "grammar": grammar.Grammar(call, "tools")}
    prompt = await chat_prompt(
        model,
        tools.template_messages(messages),
        tools=template_tools,
        template=template,
        enable_thinking=enable_thinking,
    )
    params = sampling_params(model, fields, prompt_len=len(prompt.tokens), extra_stops=prompt.stops)
    return prompt, params


def sampling_params(
    model: LlamaModel,
    fields: Mapping[str, Any],
    *,
    prompt_len: int,
    extra_stops: Sequence[str] = (),
) -> dict[str, Any]:
    """Engine parameters from validated request fields; checks what depends on the model.

    Fields the request left out (None) come from the model's Modelfile, if it has one.
    """
    fields = {**modelfile_fields(model), **{k: v for k, v in fields.items() if v is not None}}
    if prompt_len == 0:
        raise InvalidRequest("the prompt is empty", param="prompt")
    room = model.ctx_size - prompt_len
    if room < 1:
        raise InvalidRequest(
            f"the prompt is {prompt_len} tokens, which exceeds the context length of "
            f"{model.ctx_size} tokens",
            param="messages" if "messages" in fields else "prompt",
        )
    params: dict[str, Any] = {
        k: fields[k]
        for k in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repeat_penalty", "repeat_last_n", "ignore_eos", "n", "logprobs", "grammar",
        )
        if fields.get(k) is not None
    }  # fmt: skip
    if fields.get("seed") is not None:
        params["seed"] = int(fields["seed"]) & 0xFFFFFFFF
    max_tokens = fields.get("max_tokens")
    params["max_tokens"] = min(int(max_tokens), room) if max_tokens else room
    params["stop"] = list(fields.get("stop") or []) + list(extra_stops)
    if fields.get("n", 1) > model.options.parallel:
        raise InvalidRequest(
            f"n={fields['n']} exceeds the {model.options.parallel} parallel sequences of this "
            "model",
            param="n",
        )
    bias = fields.get("logit_bias")
    if bias:
        n_vocab = model.info.n_vocab
        parsed = {int(k): float(v) for k, v in bias.items()}
        bad = [t for t in parsed if t >= n_vocab]
        if bad:
            raise InvalidRequest(
                f"logit_bias token id {bad[0]} is out of range (vocabulary size {n_vocab})",
                param="logit_bias",
            )
        params["logit_bias"] = parsed
    return params


def grammar_for(format_: str | dict[str, Any] | None, param: str) -> grammar.Grammar | None:
    """A GBNF grammar forcing JSON output: any JSON for "json", else one matching a schema."""
    if not format_:
        return None
    if format_ == "json":
        return grammar.Grammar(grammar.any_json(), param)
    if not isinstance(format_, dict):
        raise InvalidRequest(f'{param}: expected "json" or a JSON schema', param=param)
    return grammar.Grammar(grammar.from_schema(format_, param), param)


async def thinking_splitters(
    model: LlamaModel, prompt: list[int], n: int = 1
) -> list[reasoning.ThinkSplitter] | None:
    """Splitters of reasoning from answer, one per choice, for a model that can think."""
    if "thinking" not in model.info.capabilities:
        return None
    tail = await model.detokenize(prompt[-4:])  # templates may open the block in the prompt
    inside = tail.rstrip().endswith(reasoning.OPEN)
    return [reasoning.ThinkSplitter(inside=inside) for _ in range(n)]
