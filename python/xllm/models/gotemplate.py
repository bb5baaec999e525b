"""Ollama's Go-template TEMPLATEs, translated to Jinja2 so they render in the same sandbox.

The common subset: `{{ .System }}`-style fields (`$.Field`, `$var.Field`), `if`/`else if`/
`else`/`end`, `range` (lists and maps, with `$i, $v :=`), `with`, `$x := ...`, the functions
`eq ne lt le gt ge and or not len index slice json print currentDate`, parentheses, pipes,
`{{-`/`-}}` trimming and comments. Anything else is a GoTemplateError (the model's own template
is then used).

Two shapes, as Ollama renders them: a template that ranges over `.Messages` is rendered once
(`.System` is every system message joined); an older one (`.System`, `.Prompt`, `.Response`)
is rendered once per turn, the last turn cut after `.Response`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from xllm.errors import InvalidRequest

_ROOT = {
    "System": "System", "Prompt": "Prompt", "Response": "Response", "Messages": "messages",
    "Tools": "tools", "Suffix": "''", "Think": "false", "IsThinkSet": "false",
    "ThinkLevel": "''",
}  # fmt: skip
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*") | (?P<raw>`[^`]*`) |
        (?P<num>-?\d+(?:\.\d+)?) |
        (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*) |
        (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.) |
        (?P<ident>[A-Za-z_][A-Za-z0-9_]*) |
        (?P<op>:=|=|\(|\)|\||,)
    )""",
    re.X | re.S,
)


class GoTemplateError(InvalidRequest):
    """A TEMPLATE in Go syntax that uses more than the subset xllm translates."""


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


@dataclass
class _Scope:
    kind: str  # "if", "range", "with"
    dot: str | None


@dataclass
class _Translator:
    dots: list[str | None] = field(default_factory=lambda: [None])
    blocks: list[_Scope] = field(default_factory=list)
    names: int = 0
    uses_messages: bool = False

    def fresh(self) -> str:
        self.names += 1
        return f"__it{self.names}"

    # --- expressions ---------------------------------------------------------------------

    def field(self, base: str | None, path: list[str]) -> str:
        if any(p.startswith("_") for p in path):
            raise GoTemplateError("TEMPLATE: fields starting with '_' are not allowed")
        if base is None:  # the root
            if not path:
                raise GoTemplateError("TEMPLATE: `.` at the top level is not supported")
            head, *rest = path
            if head not in _ROOT:
                raise GoTemplateError(f"TEMPLATE: unknown field .{head}")
            if head == "Messages":
                self.uses_messages = True
            base, path = _ROOT[head], rest
        return base + "".join(f".{_snake(p)}" for p in path)

    def operand(self, kind: str, text: str) -> str:
        if kind == "str":
            return json.dumps(json.loads(text))
        if kind == "raw":
            return json.dumps(text[1:-1])
        if kind == "num":
            return text
        if kind == "field":
            return self.field(self.dots[-1], [p for p in text.split(".") if p])
        if kind == "var":
            head, *path = text[1:].split(".")
            if head == "":
                return self.field(None, path)
            return self.field(f"v_{head}", path)
        if text in ("true", "false"):
            return text
        if text == "nil":
            return "none"
        raise GoTemplateError(f"TEMPLATE: unsupported word {text!r}")

    def call(self, name: str, args: list[str]) -> str:
        if name in _COMPARE and len(args) >= 2:
            op = _COMPARE[name]
            if name == "eq":
                return "(" + " or ".join(f"{args[0]} == {b}" for b in args[1:]) + ")"
            return f"({args[0]} {op} {args[1]})"
        if name in ("and", "or") and args:
            return "(" + f" {name} ".join(args) + ")"
        if name == "not" and len(args) == 1:
            return f"(not {args[0]})"
        if name == "len" and len(args) == 1:
            return f"({args[0]}|length)"
        if name == "index" and len(args) >= 2:
            return args[0] + "".join(f"[{a}]" for a in args[1:])
        if name == "slice" and 1 <= len(args) <= 3:
            low, high = [*args[1:], "", ""][:2]
            return f"{args[0]}[{low}:{high}]"
        if name == "json" and len(args) == 1:
            return f"({args[0]}|tojson)"
        if name == "print" and args:
            return "(" + " ~ ".join(args) + ")"
        if name == "currentDate" and not args:
            return "strftime_now('%Y-%m-%d')"
        raise GoTemplateError(f"TEMPLATE: unsupported function {name!r} ({len(args)} arguments)")

    def pipeline(self, tokens: list[tuple[str, str]]) -> str:
        commands: list[list[tuple[str, str]]] = [[]]
        depth = 0
        for tok in tokens:
            if tok == ("op", "|") and depth == 0:
                commands.append([])
                continue
            depth += tok == ("op", "(")
            depth -= tok == ("op", ")")
            commands[-1].append(tok)
        value: str | None = None
        for cmd in commands:
            value = self.command(cmd, value)
        if value is None:
            raise GoTemplateError("TEMPLATE: empty action")
        return value

    def command(self, tokens: list[tuple[str, str]], piped: str | None) -> str:
        args: list[str] = []
        i = 0
        while i < len(tokens):
            kind, text = tokens[i]
            if (kind, text) == ("op", "("):
                depth, j = 1, i + 1
                while j < len(tokens) and depth:
                    depth += tokens[j] == ("op", "(")
                    depth -= tokens[j] == ("op", ")")
                    j += 1
                if depth:
                    raise GoTemplateError("TEMPLATE: unbalanced parentheses")
                value = self.pipeline(tokens[i + 1 : j - 1])
                if j < len(tokens) and tokens[j][0] == "field" and tokens[j][1] != ".":
                    value = self.field(value, [p for p in tokens[j][1].split(".") if p])
                    j += 1  # (index .Messages 0).Content
                args.append(value)
                i = j
                continue
            if kind == "op":
                raise GoTemplateError(f"TEMPLATE: unexpected {text!r}")
            if kind == "ident" and text not in ("true", "false", "nil") and not args:
                args.append("\0" + text)  # a function name
            else:
                args.append(self.operand(kind, text))
            i += 1
        if piped is not None:
            args.append(piped)
        if not args:
            raise GoTemplateError("TEMPLATE: empty command")
        if args[0].startswith("\0"):
            return self.call(args[0][1:], args[1:])
        if len(args) != 1:
            raise GoTemplateError("TEMPLATE: a value cannot take arguments")
        return args[0]


def _tokens(action: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(action.rstrip()):
        m = _TOKEN.match(action, pos)
        if m is None or m.end() == pos:
            raise GoTemplateError(f"TEMPLATE: cannot read {action.strip()[:60]!r}")
        kind = m.lastgroup
        assert kind is not None
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _actions(source: str) -> list[tuple[str, str | None, bool, bool]]:
    """(text before, action, trim left, trim right) per `{{ }}`; a last (tail, None, ...)."""
    out: list[tuple[str, str | None, bool, bool]] = []
    pos = 0
    while (start := source.find("{{", pos)) >= 0:
        i, quote = start + 2, ""
        while i < len(source):
            c = source[i]
            if quote:
                if c == "\\" and quote == '"':
                    i += 1
                elif c == quote:
                    quote = ""
            elif c in '"`':
                quote = c
            elif source.startswith("}}", i):
                break
            i += 1
        else:
            raise GoTemplateError("TEMPLATE: an action is not closed with }}")
        inner = source[start + 2 : i]
        left = inner.startswith("- ") or inner == "-"
        right = inner.endswith(" -")
        inner = inner[2 if left else 0 : len(inner) - 2 if right else len(inner)]
        out.append((source[pos:start], inner.strip(), left, right))
        pos = i + 2
    out.append((source[pos:], None, False, False))
    return out


def _tag(body: str, left: bool, right: bool) -> str:
    """A Jinja tag that trims exactly where the Go action did (and nowhere else)."""
    return "{%" + ("-" if left else "+") + f" {body} " + ("-" if right else "+") + "%}"


def _literal(text: str) -> str:
    """Go's literal text, safe from Jinja's own `{{`, `{%` and `{#`."""
    return text.replace("{", "{{ '{' }}")


_ENDS = {"if": "endif", "range": "endfor", "with": "endif"}


def _close(block: _Scope, left: bool = False, right: bool = False) -> str:
    return _tag(_ENDS[block.kind], left, right) + (
        "{%+ endwith +%}" if block.kind == "with" else ""
    )


def _writes_response(action: str) -> bool:
    return bool(re.search(r"(^|[\s(])\$?\.Response\b", action)) and not re.match(
        r"(if|else|range|with|end)\b", action
    )


def _render(source: str, cut_at_response: bool = False) -> tuple[str, _Translator]:
    """The translation; with `cut_at_response`, only up to the first write of `.Response`
    (the blocks open there closed), which is how Ollama renders the last turn."""
    t = _Translator()
    out: list[str] = []
    for text, action, left, right in _actions(source):
        out.append(_literal(text))
        if action is None:
            break
        if action.startswith("/*"):
            out.append(_tag("set __ = none", left, right))  # a comment; it still trims
            continue
        out.append(_translate(action, left, right, t))
        if cut_at_response and _writes_response(action):
            out += [_close(b) for b in reversed(t.blocks)]
            return "".join(out), t
    if t.blocks:
        raise GoTemplateError(f"TEMPLATE: an {{{{ {t.blocks[-1].kind} }}}} has no {{{{ end }}}}")
    return "".join(out), t


def _translate(action: str, left: bool, right: bool, t: _Translator) -> str:
    words = action.split(None, 1)
    keyword = words[0] if words else ""
    rest = words[1] if len(words) > 1 else ""
    if keyword == "if":
        t.blocks.append(_Scope("if", t.dots[-1]))
        return _tag(f"if {t.pipeline(_tokens(rest))}", left, right)
    if keyword == "else":
        if not t.blocks:
            raise GoTemplateError("TEMPLATE: {{ else }} outside a block")
        if rest.startswith("if "):
            return _tag(f"elif {t.pipeline(_tokens(rest[3:]))}", left, right)
        return _tag("else", left, right)
    if keyword == "end":
        if not t.blocks:
            raise GoTemplateError("TEMPLATE: {{ end }} without a block")
        block = t.blocks.pop()
        if block.kind in ("range", "with"):
            t.dots.pop()
        return _close(block, left, right)
    if keyword == "range":
        return _range(rest, left, right, t)
    if keyword == "with":
        name = t.fresh()
        value = t.pipeline(_tokens(rest))
        t.blocks.append(_Scope("with", t.dots[-1]))
        t.dots.append(name)
        return f"{{%+ with {name} = {value} +%}}" + _tag(f"if {name}", left, right)
    if keyword in ("define", "template", "block", "break", "continue"):
        raise GoTemplateError(f"TEMPLATE: {{{{ {keyword} }}}} is not supported")
    m = re.fullmatch(r"\$([A-Za-z0-9_]+)\s*:?=\s*(.+)", action, re.S)
    if m:
        return _tag(f"set v_{m.group(1)} = {t.pipeline(_tokens(m.group(2)))}", left, right)
    expr = t.pipeline(_tokens(action))
    return ("{{-" if left else "{{") + f" {expr} " + ("-}}" if right else "}}")


def _range(rest: str, left: bool, right: bool, t: _Translator) -> str:
    m = re.fullmatch(r"(?:\$(\w+)\s*(?:,\s*\$(\w+)\s*)?:=\s*)?(.+)", rest, re.S)
    if m is None:
        raise GoTemplateError("TEMPLATE: cannot read a range")
    first, second, pipe = m.group(1), m.group(2), m.group(3)
    value = t.pipeline(_tokens(pipe))
    item = t.fresh()
    key_var, val_var = (first, second) if second else (None, first)
    sets = []
    if key_var:
        sets.append(f"set v_{key_var} = ({item}[0] if {value} is mapping else loop.index0)")
    dot = f"v_{val_var}" if val_var else t.fresh()
    sets.append(f"set {dot} = ({item}[1] if {value} is mapping else {item})")
    t.blocks.append(_Scope("range", t.dots[-1]))
    t.dots.append(dot)
    # Go ranges over a map in key order, as dictsort does
    head = _tag(f"for {item} in ({value}|dictsort if {value} is mapping else {value})", left, False)
    return head + "".join("{%+ " + s + " +%}" for s in sets[:-1]) + _tag(sets[-1], False, right)


_PREAMBLE = (
    "{%- set System = messages|selectattr('role', 'equalto', 'system')"
    "|map(attribute='content')|join('\\n\\n') -%}"
    "{%- set Prompt = '' -%}{%- set Response = '' +%}"
)
_TURNS = """\
{%- set __t = namespace(system='', prompt='', response='') -%}
{%- for __m in messages -%}
{%- if __m.role == 'system' -%}
{%- if __t.prompt or __t.response -%}{{ __turn(__t.system, __t.prompt, __t.response) }}\
{%- set __t.system = '' -%}{%- set __t.prompt = '' -%}{%- set __t.response = '' -%}{%- endif -%}
{%- set __t.system = __m.content -%}
{%- elif __m.role == 'user' -%}
{%- if __t.response -%}{{ __turn(__t.system, __t.prompt, __t.response) }}\
{%- set __t.system = '' -%}{%- set __t.prompt = '' -%}{%- set __t.response = '' -%}{%- endif -%}
{%- set __t.prompt = __m.content -%}
{%- elif __m.role == 'assistant' -%}
{%- set __t.response = __m.content -%}
{%- endif -%}
{%- endfor -%}
{{- __last(__t.system, __t.prompt, __t.response) -}}"""


def to_jinja(source: str) -> str:
    """The Jinja2 equivalent of an Ollama Go template (GoTemplateError if it is beyond us)."""
    body, t = _render(source)
    if t.uses_messages:
        return _PREAMBLE + body
    last, _ = _render(source, cut_at_response=True)
    args = "System, Prompt, Response"
    return (
        f"{{%- macro __turn({args}) +%}}{body}{{%+ endmacro -%}}"
        f"{{%- macro __last({args}) +%}}{last}{{%+ endmacro -%}}" + _TURNS
    )
