"""`xllm pull`, `push`, `show`, `rm`, `cp` and `create`: model management through the server.

As Ollama's CLI does, each talks to the server at `XLLM_HOST` and says so when none is up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xllm.cli import client
from xllm.cli.progress import Progress


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("pull", help="download a model (Hugging Face Hub, Ollama registry)")
    p.add_argument("model", help="name[:tag], org/repo[:quant] or hf.co/org/repo[:quant]")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a registry")
    p.add_argument(
        "--part", action="append", default=[], metavar="PART=FILE", type=_part,
        help="a diffusion model's part (diffusion_model, model, llm, t5xxl, clip_l, clip_g, vae, "
        "taesd) and its file in the repo, or hf.co/ORG/REPO/FILE; repeat for each part",
    )  # fmt: skip
    p.set_defaults(func=pull)
    p = commands.add_parser("push", help="upload a model to a registry")
    p.add_argument("model")
    p.add_argument("--insecure", action="store_true", help="allow plain HTTP to a registry")
    p.set_defaults(func=push)
    p = commands.add_parser("show", help="show a model's details, template, parameters...")
    p.add_argument("model")
    for flag, what in (
        ("--modelfile", "the Modelfile"),
        ("--parameters", "the parameters"),
        ("--template", "the template"),
        ("--system", "the system message"),
        ("--license", "the license"),
    ):
        p.add_argument(flag, action="store_true", help=f"print only {what}")
    p.add_argument("-v", "--verbose", action="store_true", help="all metadata")
    p.set_defaults(func=show)
    p = commands.add_parser("rm", help="delete models (refused while loaded without --force)")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("-f", "--force", action="store_true", help="unload a loaded model first")
    p.set_defaults(func=rm)
    p = commands.add_parser("cp", help="copy a model under a new name")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=cp)
    p = commands.add_parser("create", help="create a model from a Modelfile")
    p.add_argument("model")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    p.add_argument("-q", "--quantize", help="quantize to this type (Q4_K_M, Q8_0, ...)")
    p.set_defaults(func=create)


def _run(fn: Callable[[], None]) -> int:
    try:
        fn()
    except (client.NoServer, RuntimeError, OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def show_progress(records: Iterator[dict[str, Any]]) -> None:
    progress = Progress()
    try:
        for record in records:
            progress.update(record)
    finally:
        progress.finish()


def _part(text: str) -> tuple[str, str]:
    part, sep, file = text.partition("=")
    if not sep or not part or not file:
        raise argparse.ArgumentTypeError(f"expected PART=FILE, got {text!r}")
    return part, file


def pull(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "insecure": args.insecure}
    if args.part:
        body["parts"] = dict(args.part)
        if len(body["parts"]) < len(args.part):
            print("Error: --part names a part twice", file=sys.stderr)
            return 1
    return _run(lambda: show_progress(client.stream("POST", "/api/pull", body)))


def push(args: argparse.Namespace) -> int:
    body = {"model": args.model, "insecure": args.insecure}
    return _run(lambda: show_progress(client.stream("POST", "/api/push", body)))


def _section(title: str, rows: list[tuple[str, str]]) -> str:
    if not rows:
        return ""
    width = max(len(k) for k, _ in rows) + 4
    body = "".join(f"    {k:<{width}}{v}".rstrip() + "\n" for k, v in rows)
    return f"  {title}\n{body}\n"


def _value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def show_text(info: dict[str, Any], verbose: bool) -> str:
    """`ollama show`'s layout: Model, Capabilities, Parameters, System, License sections."""
    d = info.get("details") or {}
    meta = info.get("model_info") or {}
    arch = meta.get("general.architecture", d.get("family", ""))
    model = [("architecture", str(arch)), ("parameters", str(d.get("parameter_size", "")))]
    for label, key in (("context length", "context_length"),
                       ("embedding length", "embedding_length")):  # fmt: skip
        if f"{arch}.{key}" in meta:
            model.append((label, str(meta[f"{arch}.{key}"])))
    model.append(("quantization", str(d.get("quantization_level", ""))))
    for label, key in (("languages", "languages"), ("sample rate", "sample_rate"),
                       ("speakers", "speakers")):  # fmt: skip
        value = meta.get(f"{arch}.{key}")
        if value not in (None, []):
            model.append((label, ", ".join(value) if isinstance(value, list) else str(value)))
    out = "\n" + _section("Model", model)
    out += _section("Capabilities", [(c, "") for c in info.get("capabilities") or []])
    out += _section("Projector", _projector_rows(info.get("projector_info") or {}))
    out += _section(
        "Adapters",
        [
            (a["name"], "own" if a.get("own") else "loras folder")
            for a in info.get("adapters") or ()
        ],
    )
    params = [tuple(line.split(None, 1)) for line in (info.get("parameters") or "").splitlines()]
    out += _section("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in params])
    if info.get("system"):
        out += _section("System", [(line, "") for line in info["system"].splitlines()[:2]])
    license_ = (info.get("license") or "").strip().splitlines()
    if license_:
        shown = license_[:2] + (["..."] if len(license_) > 2 else [])
        out += _section("License", [(line, "") for line in shown])
    if verbose:
        rows = [(k, _value(v)[:200]) for k, v in sorted(meta.items())]
        out += _section("Metadata", rows)
    return out


def _projector_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """A vision projector's facts as `ollama show` prints them."""
    if not meta:
        return []
    from xllm.models.summary import params_label

    rows = [("architecture", str(meta.get("general.architecture", "")))]
    if isinstance(meta.get("general.parameter_count"), int):
        rows.append(("parameters", params_label(meta["general.parameter_count"])))
    for label, key in (("embedding length", "clip.vision.embedding_length"),
                       ("dimensions", "clip.vision.projection_dim"),
                       ("projector type", "clip.projector_type")):  # fmt: skip
        if key in meta:
            rows.append((label, str(meta[key])))
    return rows


def show(args: argparse.Namespace) -> int:
    def go() -> None:
        info = client.call("POST", "/api/show", {"model": args.model, "verbose": args.verbose})
        for key in ("modelfile", "parameters", "template", "system", "license"):
            if getattr(args, key):
                text = info.get(key) or ""
                if not text and key != "modelfile":
                    print(f"this model has no {key}", file=sys.stderr)
                print(text.rstrip("\n"))
                return
        print(show_text(info, args.verbose), end="")

    return _run(go)


def rm(args: argparse.Namespace) -> int:
    def go() -> None:
        loaded = {m["name"] for m in client.call("GET", "/api/ps")["models"]}
        for name in args.models:
            full = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
            if full in loaded or name in loaded:
                if not args.force:
                    raise RuntimeError(
                        f"model '{name}' is loaded; stop it with `xllm stop {name}` or use "
                        "`xllm rm --force`"
                    )
                client.call("POST", "/api/generate", {"model": name, "keep_alive": 0})
            client.call("DELETE", "/api/delete", {"model": name})
            print(f"deleted '{name}'")

    return _run(go)


def cp(args: argparse.Namespace) -> int:
    def go() -> None:
        client.call("POST", "/api/copy", {"source": args.source, "destination": args.destination})
        print(f"copied '{args.source}' to '{args.destination}'")

    return _run(go)


def _local_file(value: str, base: Path) -> Path | None:
    """A FROM or ADAPTER value that names a file (or a model folder) next to the Modelfile,
    or anywhere."""
    if not value.startswith(("/", "./", "../", "~")) and not value.lower().endswith(
        (".gguf", ".onnx")
    ):
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise ValueError(f"{value}: no such file")
    return path


def upload(path: Path, progress: Progress) -> str:
    """Send a local file to the server as a blob (skipped when it has it); its digest."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = f"sha256:{h.hexdigest()}"
    if client.status("HEAD", f"/api/blobs/{digest}") == 200:
        return digest
    size = path.stat().st_size
    status = f"copying file {digest.removeprefix('sha256:')[:12]}"

    def chunks() -> Iterator[bytes]:
        sent = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                sent += len(chunk)
                progress.update({"status": status, "digest": digest, "total": size,
                                 "completed": sent})  # fmt: skip
                yield chunk

    client.upload(f"/api/blobs/{digest}", chunks(), size)
    progress.update({"status": status, "digest": digest, "total": size, "completed": size})
    return digest


def upload_model(path: Path, progress: Progress) -> dict[str, str]:
    """Upload a GGUF (every file of a split one): `files` for /api/create."""
    from xllm.models import gguf

    try:
        files = gguf.model_files(path)
    except gguf.GGUFError as e:
        raise ValueError(e.message) from None
    return {f.name: upload(f, progress) for f in files}


def upload_converted(folder: Path, progress: Progress) -> dict[str, str]:
    """A Hugging Face folder converted here to one GGUF (F16), uploaded: `files`."""
    import tempfile

    from xllm.models import convert
    from xllm.models.safetensors import SafetensorsError

    with tempfile.TemporaryDirectory(prefix="xllm-convert-") as tmp:
        out = Path(tmp) / f"{folder.resolve().name}.gguf"
        progress.update({"status": "converting model"})
        try:
            convert.convert(folder, out, "f16", lambda n, total: progress.update(
                {"status": "converting model", "digest": "convert", "total": total,
                 "completed": n}))  # fmt: skip
        except SafetensorsError as e:
            raise ValueError(e.message) from None
        return {out.name: upload(out, progress)}


def create(args: argparse.Namespace) -> int:
    from xllm.models import folders, modelfile

    def go() -> None:
        path = Path(args.file)
        try:
            mf = modelfile.parse(path.read_text())
        except modelfile.ModelfileError as e:
            raise ValueError(f"{path}: {e.message}") from None
        if not mf.from_:
            raise ValueError(f"{path}: no FROM line")
        body: dict[str, Any] = {"model": args.model}
        progress = Progress()
        progress.update({"status": "gathering model components"})
        local = _local_file(mf.from_, path.parent)
        folder = folders.local_files(local) if local is not None else None
        if local is not None and folder is not None and folder[0].name != "safetensors":
            body["files"] = {n: upload(f, progress) for n, f in folder[1].items()}  # speech
        elif local is not None and local.is_dir():
            body["files"] = upload_converted(local, progress)
        elif local is not None:
            body["files"] = upload_model(local, progress)
        else:
            body["from"] = mf.from_
        for extra in mf.also_from:  # a vision projector: the server tells it by its metadata
            projector = _local_file(extra, path.parent)
            if projector is None or projector.is_dir():
                raise ValueError(f"{path}: FROM {extra}: only the first FROM may name a model")
            body["files"] = {**body.get("files", {}), projector.name: upload(projector, progress)}
        if mf.adapters:
            adapters = {}
            for a in mf.adapters:
                file = _local_file(a, path.parent) or Path(a)
                adapters[file.name] = upload(file, progress)
            body["adapters"] = adapters
        for key, value in (("template", mf.template), ("system", mf.system)):
            if value is not None:
                body[key] = value
        if mf.parameters:
            body["parameters"] = mf.parameters
        if mf.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in mf.messages]
        if mf.license:
            body["license"] = list(mf.license)
        if args.quantize:
            body["quantize"] = args.quantize
        try:
            for record in client.stream("POST", "/api/create", body):
                progress.update(record)
        finally:
            progress.finish()

    return _run(go)
