"""Ollama's Modelfile: a parser whose errors name the line, a writer, and typed parameters.

    FROM llama3.2                      # a model name, or a GGUF file for `xllm create`
    FROM ./mmproj.gguf                 # a second FROM: a vision model's projector file
    PARAMETER temperature 0.7          # Ollama's option names and types; `stop` repeats
    SYSTEM \"\"\"You are terse.\"\"\"        # \"\"\" values span lines; "..." takes \\" and \\\\
    TEMPLATE ...  MESSAGE user Hi  ADAPTER ./lora.gguf  LICENSE ...

Commands are case-insensitive; `#` starts a comment line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xllm.engine.protocol import SPECULATIVE
from xllm.errors import InvalidRequest

# Ollama's options (api.Options and api.Runner) with their types.
PARAMETERS: dict[str, type] = {
    **dict.fromkeys(
        ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed",
         "num_predict", "top_k", "repeat_last_n", "mirostat", "draft_num_predict"),
        int,
    ),
    **dict.fromkeys(
        ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
         "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta"),
        float,
    ),
    **dict.fromkeys(
        ("penalize_newline", "use_mmap", "use_mlock", "numa", "low_vram", "f16_kv",
         "logits_all", "vocab_only"),
        bool,
    ),
    "stop": list,
    "speculative": str,  # xllm's: "ngram", "draft", "auto" or "none" (SPECULATIVE)
    "draft_model": str,  # xllm's: the draft model loaded beside this one
}  # fmt: skip
_CHOICES = {"speculative": SPECULATIVE}
"""The values a text parameter takes."""
ROLES = ("system", "user", "assistant")
COMMANDS = ("from", "parameter", "template", "system", "adapter", "license", "message")
_WORD = re.compile(r"\S+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


class ModelfileError(InvalidRequest):
    """A Modelfile (or a create request's fields) that cannot be used; says where."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Modelfile:
    """What a Modelfile says; also what a stored model carries (its request defaults)."""

    from_: str | None = None
    also_from: tuple[str, ...] = ()
    """Further FROM lines: a vision model's projector file (told from the model by what the
    file holds, not by which line names it)."""
    parameters: dict[str, Any] = field(default_factory=dict)
    """Ollama option name -> value of its type (`stop`: a list of strings)."""
    template: str | None = None
    system: str | None = None
    messages: tuple[Message, ...] = ()
    adapters: tuple[str, ...] = ()
    license: tuple[str, ...] = ()


def parameter_value(name: str, value: Any) -> Any:
    """`value` (text from a Modelfile, or JSON from a request) as parameter `name`'s type.

    `stop` comes back as a list; ValueError says what is wrong.
    """
    kind = PARAMETERS.get(name)
    if kind is None:
        raise ValueError(f"unknown parameter {name!r}")
    if kind is str:
        choices = _CHOICES.get(name)
        value = value.strip() if isinstance(value, str) else value
        if choices is None:  # free text: a name
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
            return value
        if value not in choices:
            raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    if kind is list:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(s, str) for s in items):
            raise ValueError(f"{name}: expected a string or a list of strings, got {value!r}")
        return list(items)
    if isinstance(value, str):
        return _from_text(name, kind, value.strip())
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON clients send 4096.0 now and then
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return float(value)
    raise ValueError(f"{name}: expected {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def _from_text(name: str, kind: type, text: str) -> Any:
    if kind is bool:
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif kind is int:
        if re.fullmatch(r"[+-]?\d{1,19}", text):
            return int(text)
    else:
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise ValueError(f"{name}: expected {_KIND_NAMES[kind]}, got {text!r}")


def parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """A request's `parameters` object typed as a Modelfile's (ValueError names the key)."""
    return {str(k): parameter_value(str(k), v) for k, v in values.items()}


class _Reader:
    """A cursor over the text that knows its line number."""

    def __init__(self, text: str) -> None:
        self.text = text.replace("\r\n", "\n")
        self.pos = 0

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def error(self, message: str, line: int | None = None) -> ModelfileError:
        return ModelfileError(f"Modelfile line {line or self.line}: {message}")

    def skip_blank(self) -> None:
        while self.pos < len(self.text):
            if self.text[self.pos] in " \t\n":
                self.pos += 1
            elif self.text[self.pos] == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def word(self) -> str:
        m = _WORD.match(self.text, self.pos)
        if m is None:
            return ""
        self.pos = m.end()
        return m.group(0)

    def spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def value(self, what: str) -> str:
        """The rest of the command: a triple-quoted or quoted value, or up to the line's end."""
        self.spaces()
        start_line = self.line
        if self.text.startswith('"""', self.pos):
            end = self.text.find('"""', self.pos + 3)
            if end < 0:
                raise self.error(f'{what}: unterminated """', start_line)
            out = self.text[self.pos + 3 : end]
            self.pos = end + 3
        elif self.text.startswith('"', self.pos):
            m = _QUOTED.match(self.text, self.pos)
            if m is None:
                raise self.error(f'{what}: unterminated "', start_line)
            out = re.sub(r"\\(.)", r"\1", m.group(1), flags=re.S)
            self.pos = m.end()
        else:
            end = self.text.find("\n", self.pos)
            end = len(self.text) if end < 0 else end
            out = self.text[self.pos : end].strip()
            self.pos = end
            if not out:
                raise self.error(f"{what} needs a value", start_line)
            return out
        self.spaces()
        if self.pos < len(self.text) and self.text[self.pos] != "\n":
            raise self.error(f"{what}: unexpected text after the closing quote")
        return out


def parse(text: str) -> Modelfile:
    """Parse a Modelfile; ModelfileError (a 400) names the line of the first mistake."""
    r = _Reader(text)
    froms: list[str] = []
    params: dict[str, Any] = {}
    template = system = None
    messages: list[Message] = []
    adapters: list[str] = []
    licenses: list[str] = []
    while True:
        r.skip_blank()
        if r.pos >= len(r.text):
            break
        line = r.line
        command = r.word()
        key = command.lower()
        if key not in COMMANDS:
            expected = ", ".join(c.upper() for c in COMMANDS)
            raise r.error(f"unknown command {command[:40]!r}; expected one of {expected}")
        if key == "parameter":
            r.spaces()
            name = r.word()
            if not name:
                raise r.error("PARAMETER needs a name and a value", line)
            raw = r.value(f"PARAMETER {name}")
            try:
                value = parameter_value(name.lower(), raw)
            except ValueError as e:
                raise r.error(f"PARAMETER {e}", line) from None
            if name.lower() == "stop":
                params.setdefault("stop", []).extend(value)
            else:
                params[name.lower()] = value
        elif key == "message":
            r.spaces()
            role = r.word().lower()
            if role not in ROLES:
                raise r.error(f"MESSAGE role must be one of {', '.join(ROLES)}", line)
            messages.append(Message(role, r.value("MESSAGE")))
        else:
            value = r.value(key.upper())
            if key == "from":
                froms.append(value)
            elif key == "template":
                template = value
            elif key == "system":
                system = value
            elif key == "adapter":
                adapters.append(value)
            else:
                licenses.append(value)
    return Modelfile(
        from_=froms[0] if froms else None,
        also_from=tuple(froms[1:]),
        parameters=params,
        template=template,
        system=system,
        messages=tuple(messages),
        adapters=tuple(adapters),
        license=tuple(licenses),
    )


def quote(value: str) -> str:
    """A value as the parser reads it back unchanged."""
    if value and "\n" not in value and '"' not in value and value == value.strip():
        return value
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return quote(str(value))


def to_text(mf: Modelfile, from_: str | None = None) -> str:
    """The Modelfile text for `mf` (`from_` replaces its FROM); `parse` reads it back."""
    lines = []
    source = from_ if from_ is not None else mf.from_
    if source:
        lines.append(f"FROM {quote(source)}")
    lines += [f"FROM {quote(x)}" for x in mf.also_from]
    if mf.template is not None:
        lines.append(f"TEMPLATE {quote(mf.template)}")
    if mf.system is not None:
        lines.append(f"SYSTEM {quote(mf.system)}")
    for adapter in mf.adapters:
        lines.append(f"ADAPTER {quote(adapter)}")
    for name, value in mf.parameters.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {name} {_param_text(v)}")
    for m in mf.messages:
        lines.append(f"MESSAGE {m.role} {quote(m.content)}")
    for text in mf.license:
        lines.append(f"LICENSE {quote(text)}")
    return "\n".join(lines) + "\n"


_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.|\$|if\s|range\s|with\s|end\b|else\b|template\s|block\s|/\*|"
    r"\(?(?:index|slice|len|eq|ne|not|and|or|json|print)\s+[.$(])"
)


def is_go_template(template: str) -> bool:
    """True for Ollama's Go template syntax (`{{ .Prompt }}`), False for Jinja2 (HF style)."""
    return "{%" not in template and bool(_GO_ACTION.search(template))
