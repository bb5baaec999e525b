"""Ollama's Go-template TEMPLATEs, translated to Jinja2 and rendered in the sandbox, produce
what Ollama's Go renderer produces (outputs worked out from text/template's rules)."""

from __future__ import annotations

from typing import Any

import pytest

from xllm.models.gotemplate import GoTemplateError, to_jinja
from xllm.models.modelfile import is_go_template
from xllm.models.template import TemplateError, render_chat

SYS = {"role": "system", "content": "S"}
U1 = {"role": "user", "content": "U1"}
A1 = {"role": "assistant", "content": "A1"}
U2 = {"role": "user", "content": "U2"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"properties": {"b": {"type": "int"}, "a": {"type": "str"}}},
    },
}

CASES: list[tuple[str, list[dict[str, Any]], str]] = [
    # older templates: one rendering per turn, the last one cut after .Response
    ("{{ .System }}|{{ .Prompt }}|{{ .Response }}#", [U1], "|U1|"),
    ("{{ .System }}|{{ .Prompt }}|{{ .Response }}#", [SYS, U1, A1, U2], "S|U1|A1#|U2|"),
    ("{{ .System }}|{{ .Prompt }}|{{ .Response }}#", [U1, A1], "|U1|A1"),
    ("{{ if .System }}<s>{{ .System }}</s>\n{{ end }}<u>{{ .Prompt }}</u>\n<a>{{ .Response }}</a>\n",
     [SYS, U1], "<s>S</s>\n<u>U1</u>\n<a>"),
    ("{{ if .Prompt }}[{{ .Prompt }}]{{ end }}{{ if .Response }}{{ .Response }}{{ end }}.", [U1],
     "[U1]"),
    # templates over .Messages: one rendering
    ("{{ range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}<assistant>", [SYS, U1, A1, U2],
     "<system>S<user>U1<assistant>A1<user>U2<assistant>"),
    ("{{- if .System }}SYS={{ .System }}\n{{ end }}{{- range .Messages }}{{ if eq .Role \"user\" }}"
     "U:{{ .Content }}\n{{ else if eq .Role \"assistant\" }}A:{{ .Content }}\n{{ end }}{{ end }}A:",
     [SYS, U1, A1, U2], "SYS=S\nU:U1\nA:A1\nU:U2\nA:"),
    ("{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
     "{{ .Content }}{{ if $last }}!{{ else }},{{ end }}{{- end }}", [U1, A1, U2], "U1,A1,U2!"),
    ("{{ range $i, $m := .Messages }}{{ $i }}={{ $m.Content }};{{ end }}", [U1, A1], "0=U1;1=A1;"),
    ("a  {{- range .Messages }} {{ .Content }} {{ end -}}  b", [U1, A1], "a U1  A1 b"),
    ("{{ range .Messages }}{{ if .ToolCalls }}{{ range .ToolCalls }}{{ .Function.Name }}"
     "{{ json .Function.Arguments }}{{ end }}{{ else }}{{ .Content }}{{ end }};{{ end }}",
     [U1, CALL], 'U1;f{"x": 1};'),
    ("{{ range .Messages }}{{ end }}{{ range $.Tools }}{{ range $k, $v := .Function.Parameters.Properties }}"
     "{{ $k }}:{{ $v.Type }} {{ end }}{{ end }}", [U1], "a:str b:int "),
    ("{{ range .Messages }}{{ end }}{{ with .Tools }}T{{ len . }}{{ else }}none{{ end }}", [U1], "T1"),
    ("{{ range .Messages }}{{ end }}{{ with .System }}S={{ . }}{{ else }}none{{ end }}", [U1], "none"),
    ("{{ range .Messages }}{{ if and (ne .Role \"system\") (not (eq .Content \"\")) }}{{ .Content }}"
     "{{ end }}{{ end }}", [SYS, U1], "SU1"[1:]),
    ("{{ range .Messages }}{{ print .Role \"-\" .Content }} {{ end }}", [U1], "user-U1 "),
    ("{{ (index .Messages 0).Content }}{{ len .Messages | print }}", [U1, A1], "U12"),
    ('{{ range .Messages }}{"role": "{{ .Role }}"}{{ end }}', [U1], '{"role": "user"}'),
    ("{{/* a comment */}}{{- /* trimmed */ -}}  {{ range .Messages }}{{ .Content }}{{ end }}", [U1],
     "U1"),
    ("{{ range .Messages }}{{ `raw\\n` }}{{ end }}", [U1], "raw\\n"),
    ("{{ if lt (len .Messages) 2 }}one{{ else }}more{{ end }}{{ range .Messages }}{{ end }}", [U1],
     "one"),
]  # fmt: skip


@pytest.mark.parametrize(("go", "messages", "want"), CASES)
def test_translation_renders_like_ollama(
    go: str, messages: list[dict[str, Any]], want: str
) -> None:
    assert is_go_template(go)
    tools = [TOOL] if "Tools" in go else None
    assert render_chat(to_jinja(go), messages, tools=tools) == want


def test_tools_reach_the_template() -> None:
    go = "{{ if .Tools }}{{ json .Tools }}{{ end }}{{ range .Messages }}{{ end }}"
    out = render_chat(to_jinja(go), [U1], tools=[TOOL])
    assert out.startswith('[{"type": "function"')


@pytest.mark.parametrize(
    ("go", "message"),
    [
        ('{{ template "x" . }}', "not supported"),
        ('{{ define "x" }}{{ end }}', "not supported"),
        ('{{ printf "%s" .Prompt }}', "unsupported function 'printf'"),
        ("{{ if .Prompt }}open", "has no {{ end }}"),
        ("{{ end }}", "without a block"),
        ("{{ .Nope }}", "unknown field .Nope"),
        ("{{ .Prompt ", "not closed"),
        ("{{ .Prompt.__class__ }}", "'_'"),
        ("{{ range .Messages }}{{ .Content.__globals__ }}{{ end }}", "'_'"),
        ("{{ .Prompt .System }}", "cannot take arguments"),
        ("{{ (.Prompt }}", "parentheses"),
        ("{{ @ }}", "cannot read"),
    ],
)
def test_unsupported_templates(go: str, message: str) -> None:
    with pytest.raises(GoTemplateError) as e:
        to_jinja(go)
    assert message in e.value.message and e.value.status == 400


def test_jinja_syntax_in_literal_text_stays_text() -> None:
    go = "{% raise %}{# x #}{{ range .Messages }}{{ .Content }}{{ end }}"
    assert render_chat(to_jinja(go), [U1]) == "{% raise %}{# x #}U1"


def test_sandbox_still_applies() -> None:
    go = "{{ range .Messages }}{{ .Content }}{{ end }}"
    evil = [{"role": "user", "content": "{{ ''.__class__ }}"}]
    assert render_chat(to_jinja(go), evil) == "{{ ''.__class__ }}"  # data, not code
    with pytest.raises(TemplateError):
        render_chat(to_jinja(go) + "{{ ''.__class__.__mro__ }}", [U1])


def test_is_go_template() -> None:
    assert is_go_template("{{ .Prompt }}") and is_go_template("{{- range .Messages }}{{ end }}")
    assert is_go_template("{{ if .System }}x{{ end }}")
    assert not is_go_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not is_go_template("{{ messages[0].content }}") and not is_go_template("plain")
