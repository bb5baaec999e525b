"""Delivery files stay true to the code: the systemd unit and the PyInstaller spec."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xllm.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "xllm.service"
SPEC = ROOT / "packaging" / "xllm.spec"


def _exec_start() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            return line.removeprefix("ExecStart=").split()
    raise AssertionError("no ExecStart in the unit")


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, (
        "systemd-analyze is required (Debian package systemd; tests/setup.sh installs it)"
    )
    xllm = shutil.which("xllm") or str(Path(sys.executable).parent / "xllm")
    unit = tmp_path / "xllm.service"
    unit.write_text(UNIT.read_text().replace(_exec_start()[0], xllm))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_unit_runs_a_real_command() -> None:
    argv = _exec_start()
    assert argv[0].endswith("/xllm")
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    text = UNIT.read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "Restart=on-failure",
        "KillMode=mixed",
    ):
        assert directive in text


def _lazy_third_party_imports() -> set[str]:
    """Modules imported inside functions: PyInstaller cannot see those by itself."""
    stdlib = set(sys.stdlib_module_names)
    found: set[str] = set()
    for path in (ROOT / "python" / "xllm").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] not in stdlib and not name.startswith("xllm"):
                        found.add(name)
    return found


def test_spec_names_every_lazy_import() -> None:
    spec = SPEC.read_text()
    missing = [
        m
        for m in sorted(_lazy_third_party_imports())
        if f'"{m}"' not in spec and f'"{m.split(".")[0]}"' not in spec
    ]
    assert not missing, f"add to hiddenimports in packaging/xllm.spec: {missing}"


@pytest.mark.parametrize("package", ["llama_cpp", "xllm", "llama_cpp_python"])
def test_spec_bundles_runtime_files(package: str) -> None:
    assert package in SPEC.read_text()
