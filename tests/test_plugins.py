"""Engine plugins: manifests checked at start-up, bad plugins refused with a clear message while
the others keep working, models matched to engines by format and architecture.

Discovery goes through real entry points: a distribution's metadata (`*.dist-info`) written to a
folder on `sys.path`, as pip would install a plugin package.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fake_engine
from xllm.engine import plugins
from xllm.engine.plugins import Engines, Manifest, PluginError, check
from xllm.engine.protocol import ABI_VERSION
from xllm.errors import InvalidRequest

GOOD = {
    "name": "toy",
    "version": "1.0",
    "abi": ABI_VERSION,
    "formats": ["safetensors"],
    "architectures": ["ToyLM"],
    "capabilities": ["chat"],
    "load": fake_engine._load,
}


def test_a_mapping_manifest_is_checked_into_a_manifest() -> None:
    m = check(GOOD)
    assert isinstance(m, Manifest)
    assert m.serves("safetensors", "ToyLM") and not m.serves("gguf", "ToyLM")
    assert not m.serves("safetensors", "LlamaForCausalLM")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": None}, "lacks version"),
        ({"formats": []}, "lacks formats"),
        ({"architectures": []}, "lacks architectures"),
        ({"abi": ABI_VERSION + 1}, f"ABI {ABI_VERSION + 1}; this xllm has ABI {ABI_VERSION}"),
        ({"formats": ["onnx-magic"]}, "format 'onnx-magic', which xllm does not know"),
        ({"capabilities": ["telepathy"]}, "capability 'telepathy'"),
        ({"load": "not a function"}, "load is not callable"),
        ({"architectures": "ToyLM"}, "architectures must be a list of strings"),
    ],
)
def test_bad_manifests_are_refused_naming_the_defect(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(PluginError, match=message.replace("(", r"\(")):
        check({**GOOD, **change})


def test_the_builtin_engine_declares_what_llama_cpp_loads() -> None:
    engines = Engines.discover()
    llama = engines.manifests["llama.cpp"]
    assert llama.formats == ("gguf",)
    assert {"llama", "qwen2", "gemma3", "bert"} <= llama.architectures
    assert "clip" not in llama.architectures  # a projector is no model of its own
    assert llama.estimate is not None


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """Plugin packages 'installed' into a folder on sys.path: one good, several bad."""
    pkg = tmp_path / "toyplugins.py"
    pkg.write_text(
        textwrap.dedent(
            f"""
            from tests import fake_engine
            GOOD = {{
                "name": "toy", "version": "1.0", "abi": {ABI_VERSION},
                "formats": ["safetensors"], "architectures": ["ToyLM"],
                "capabilities": ["chat"], "load": fake_engine._load,
            }}
            MISSING = {{k: v for k, v in GOOD.items() if k != "formats"}}
            OLD_ABI = {{**GOOD, "name": "old", "abi": 0}}
            ODD_FORMAT = {{**GOOD, "name": "odd", "formats": ["tarball"]}}
            TWIN = {{**GOOD, "name": "llama.cpp"}}
            """
        )
    )
    dist = tmp_path / "toyplugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            f"""
            [{plugins.GROUP}]
            toy = toyplugins:GOOD
            missing = toyplugins:MISSING
            old = toyplugins:OLD_ABI
            odd = toyplugins:ODD_FORMAT
            twin = toyplugins:TWIN
            gone = toyplugins_not_there:MANIFEST
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toyplugins", None)


def test_discovery_refuses_bad_plugins_and_keeps_the_others(
    installed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="xllm.engine"):
        engines = Engines.discover()
    assert {"llama.cpp", "toy"} <= set(engines.manifests)
    refused = engines.refused
    assert "lacks formats" in refused["missing"]
    assert "engine ABI 0" in refused["old"]
    assert "format 'tarball'" in refused["odd"]
    assert "already registered" in refused["twin"]
    assert "ModuleNotFoundError" in refused["gone"]
    for name in ("missing", "old", "odd", "twin", "gone"):
        assert any(f"engine plugin {name!r}" in r.getMessage() for r in caplog.records)
    # the built-in engine is still the one named llama.cpp
    assert engines.manifests["llama.cpp"].formats == ("gguf",)
    states = {e["name"]: e for e in engines.states([], [])}
    assert states["toy"]["state"] == "idle"
    assert states["old"]["state"] == "error" and "refused" in states["old"]["error"]


def test_a_model_is_matched_by_format_and_architecture() -> None:
    engines = Engines([Engines.discover().manifests["llama.cpp"], fake_engine.MANIFEST])
    assert engines.for_model("m", "gguf", "llama").name == "llama.cpp"
    assert engines.for_model("m", "safetensors", "FakeLM").name == "fake"
    with pytest.raises(InvalidRequest, match="architecture 'LlamaForCausalLM'") as e:
        engines.for_model("m", "safetensors", "LlamaForCausalLM")
    assert e.value.param == "model"
    with pytest.raises(InvalidRequest, match="architecture 'martian'"):
        engines.for_model("m", "gguf", "martian")
    assert engines.for_model("m", "safetensors", "FakeLM", engine="fake").name == "fake"
    with pytest.raises(InvalidRequest, match="no engine named 'vllm'") as e:
        engines.for_model("m", "gguf", "llama", engine="vllm")
    assert e.value.param == "engine"
    with pytest.raises(InvalidRequest, match="engine 'fake' does not serve"):
        engines.for_model("m", "gguf", "llama", engine="fake")
