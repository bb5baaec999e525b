"""The Modelfile parser and writer, table-driven: Ollama's syntax, typed parameters, line errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.models import modelfile
from xllm.models.modelfile import Message, Modelfile, ModelfileError, parse, to_text

CASES = [
    ("FROM llama3.2", Modelfile(from_="llama3.2")),
    ("from ./model.gguf\n", Modelfile(from_="./model.gguf")),
    ("# a comment\nFROM m  \n\n  # another\n", Modelfile(from_="m")),
    ("FROM m\nPARAMETER temperature 0.7\nPARAMETER num_ctx 4096\nPARAMETER seed -1",
     Modelfile(from_="m", parameters={"temperature": 0.7, "num_ctx": 4096, "seed": -1})),
    ("FROM m\nPARAMETER stop <|im_end|>\nPARAMETER stop \"User:\"\nPARAMETER stop \"\"\" a \"\"\"",
     Modelfile(from_="m", parameters={"stop": ["<|im_end|>", "User:", " a "]})),
    ("FROM m\nparameter TOP_K 40\nPARAMETER top_p 0.9\nPARAMETER min_p 0.05\nPARAMETER repeat_penalty 1.1",
     Modelfile(from_="m", parameters={"top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1})),
    ("FROM m\nPARAMETER repeat_last_n 64\nPARAMETER num_predict 128\nPARAMETER presence_penalty 0.5\n"
     "PARAMETER frequency_penalty -0.5\nPARAMETER use_mmap false\nPARAMETER penalize_newline True",
     Modelfile(from_="m", parameters={"repeat_last_n": 64, "num_predict": 128, "presence_penalty": 0.5,
                                      "frequency_penalty": -0.5, "use_mmap": False, "penalize_newline": True})),
    ("FROM m\nPARAMETER temperature 0.1\nPARAMETER temperature 0.2", Modelfile(from_="m", parameters={"temperature": 0.2})),
    ("FROM m\nPARAMETER speculative ngram\nPARAMETER draft_num_predict 8",
     Modelfile(from_="m", parameters={"speculative": "ngram", "draft_num_predict": 8})),
    ('FROM m\nSYSTEM """You are\na pirate."""', Modelfile(from_="m", system="You are\na pirate.")),
    ('FROM m\nSYSTEM "say \\"hi\\" \\\\ bye"', Modelfile(from_="m", system='say "hi" \\ bye')),
    ("FROM m\nSYSTEM You are terse.   ", Modelfile(from_="m", system="You are terse.")),
    ('FROM m\nTEMPLATE """{{ if .System }}<|system|>{{ .System }}{{ end }}\n{{ .Prompt }}"""',
     Modelfile(from_="m", template="{{ if .System }}<|system|>{{ .System }}{{ end }}\n{{ .Prompt }}")),
    ('FROM m\nTEMPLATE """{% for m in messages %}{{ m.content }}{% endfor %}"""',
     Modelfile(from_="m", template="{% for m in messages %}{{ m.content }}{% endfor %}")),
    ("FROM m\nMESSAGE user Is the sky blue?\nMESSAGE assistant yes\nMESSAGE SYSTEM \"\"\"be\nbrief\"\"\"",
     Modelfile(from_="m", messages=(Message("user", "Is the sky blue?"), Message("assistant", "yes"),
                                    Message("system", "be\nbrief")))),
    ("FROM m\nADAPTER ./lora.gguf\nLICENSE MIT\nLICENSE \"\"\"Apache\n2.0\"\"\"",
     Modelfile(from_="m", adapters=("./lora.gguf",), license=("MIT", "Apache\n2.0"))),
    ("FROM m\r\nSYSTEM hi\r\n", Modelfile(from_="m", system="hi")),
    ('FROM m\nSYSTEM """"""', Modelfile(from_="m", system="")),
    ("SYSTEM only", Modelfile(system="only")),
    ('FROM m\nSYSTEM """# not a comment\nstill system"""', Modelfile(from_="m", system="# not a comment\nstill system")),
]  # fmt: skip


@pytest.mark.parametrize(("text", "want"), CASES)
def test_parse(text: str, want: Modelfile) -> None:
    assert parse(text) == want


ERRORS = [
    ("FROM m\nBOGUS x", 2, "unknown command 'BOGUS'"),
    ("FROM", 1, "FROM needs a value"),
    ("FROM m\n\nPARAMETER", 3, "PARAMETER needs a name"),
    ("FROM m\nPARAMETER temperature", 2, "PARAMETER temperature needs a value"),
    ("FROM m\nPARAMETER temperature hot", 2, "temperature: expected a number, got 'hot'"),
    ("FROM m\nPARAMETER temperature nan", 2, "expected a number"),
    ("FROM m\nPARAMETER num_ctx 4k", 2, "num_ctx: expected an integer"),
    ("FROM m\nPARAMETER num_ctx 1.5", 2, "num_ctx: expected an integer"),
    ("FROM m\nPARAMETER num_ctx 99999999999999999999999", 2, "num_ctx: expected an integer"),
    ("FROM m\nPARAMETER use_mmap maybe", 2, "use_mmap: expected true or false"),
    ("FROM m\nPARAMETER flux_capacitor 1", 2, "unknown parameter 'flux_capacitor'"),
    ("FROM m\nMESSAGE robot hi", 2, "MESSAGE role must be one of system, user, assistant"),
    ('FROM m\nSYSTEM """never\nclosed', 2, 'SYSTEM: unterminated """'),
    ('FROM m\n\nSYSTEM "open', 3, 'SYSTEM: unterminated "'),
    ('FROM m\nSYSTEM "a" b', 2, "unexpected text after the closing quote"),
    ('FROM m\nSYSTEM """a\nb""" trailing', 3, "unexpected text after the closing quote"),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ModelfileError) as e:
        parse(text)
    assert e.value.status == 400
    assert e.value.message.startswith(f"Modelfile line {line}: ")
    assert message in e.value.message


@pytest.mark.parametrize(
    ("values", "want"),
    [({"temperature": 1, "stop": "x", "num_ctx": 2048.0, "use_mmap": False, "seed": "42"},
      {"temperature": 1.0, "stop": ["x"], "num_ctx": 2048, "use_mmap": False, "seed": 42}),
     ({"speculative": "ngram", "draft_num_predict": "8"},
      {"speculative": "ngram", "draft_num_predict": 8}),
     ({"speculative": "draft", "draft_model": "qwen2.5-coder:0.5b"},
      {"speculative": "draft", "draft_model": "qwen2.5-coder:0.5b"})],
)  # fmt: skip
def test_request_parameters_are_typed(values: dict[str, object], want: dict[str, object]) -> None:
    assert modelfile.parameters(values) == want


@pytest.mark.parametrize(
    "values",
    [{"num_ctx": True}, {"num_ctx": 1.5}, {"temperature": "x"}, {"temperature": float("inf")},
     {"stop": [1]}, {"nope": 1}, {"use_mmap": 1}, {"top_k": None}, {"speculative": "eagle"},
     {"speculative": 1}, {"draft_num_predict": "x"}, {"draft_model": ""}, {"draft_model": 1}],
)  # fmt: skip
def test_bad_request_parameters(values: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        modelfile.parameters(values)


def test_writer_output() -> None:
    mf = Modelfile(
        from_="llama3.2:latest",
        parameters={"stop": ["<|eot|>", " User:"], "temperature": 0.5, "use_mmap": True},
        template="{{ .Prompt }}",
        system='Say "hi"',
        messages=(Message("user", "hello"),),
        license=("MIT",),
    )
    text = to_text(mf)
    assert text.splitlines()[0] == "FROM llama3.2:latest"
    assert "PARAMETER stop <|eot|>" in text and 'PARAMETER stop """ User:"""' in text
    assert "PARAMETER use_mmap true" in text and "MESSAGE user hello" in text
    assert parse(text) == mf
    assert to_text(mf, from_="/blobs/sha256-x").startswith("FROM /blobs/sha256-x\n")


_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r"), max_size=30)


@settings(max_examples=500, deadline=None)
@given(
    system=st.none() | _values,
    template=st.none() | _values,
    stops=st.lists(_values, max_size=3),
    messages=st.lists(st.tuples(st.sampled_from(modelfile.ROLES), _values), max_size=3),
    temperature=st.none() | st.floats(-10, 10, allow_nan=False),
)
def test_writer_round_trips(
    system: str | None,
    template: str | None,
    stops: list[str],
    messages: list[tuple[str, str]],
    temperature: float | None,
) -> None:
    params: dict[str, object] = {}
    if stops:
        params["stop"] = stops
    if temperature is not None:
        params["temperature"] = temperature
    mf = Modelfile(
        from_="m",
        parameters=params,
        template=template,
        system=system,
        messages=tuple(Message(r, c) for r, c in messages),
    )
    assert parse(to_text(mf)) == mf
