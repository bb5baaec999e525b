"""`xllm run MODEL [PROMPT]`: chat with a model of the running server, as `ollama run` does.

Like Ollama's, it needs a server (`xllm serve`) and says so when there is none. With a prompt,
or with text piped on stdin, it answers once; otherwise it opens a REPL with Ollama's commands.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xllm.cli import client

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, top_k, top_p, num_predict, seed, ...)
  /set system TEXT            Set the system message
  /show info|parameters|system|template|license
  /image PATH                 Attach an image to the next message
  /clear                      Clear the conversation
  /bye                        Exit
  /?, /help                   Help for a command

Use \"\"\" to begin and end a multi-line message (or <<<EOF ... EOF)."""


def add_parser(commands: Any) -> None:
    p = commands.add_parser("run", help="chat with a model (REPL, or one answer for a prompt)")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*", help="answer this and exit")
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH",
        help="an image for the prompt (repeatable; the model must have the vision capability)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _stream_chat(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    req = urllib.request.Request(
        client.base_url() + "/api/chat",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.strip():
                    yield json.loads(line)
    except urllib.error.HTTPError as e:
        raise RuntimeError(json.loads(e.read() or b"{}").get("error", e.reason)) from None
    except urllib.error.URLError:
        raise client.NoServer(
            f"no xllm server is running at {client.base_url()}; start one with `xllm serve`"
        ) from None


class Session:
    def __init__(self, model: str) -> None:
        self.model = model
        self.messages: list[dict[str, Any]] = []
        self.options: dict[str, Any] = {}
        self.system: str | None = None
        self.images: list[str] = []

    def ask(self, text: str, out: Any = None) -> str:
        out = out if out is not None else sys.stdout  # as it is now, not as it was at import
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            *self.messages,
            {"role": "user", "content": text, **({"images": self.images} if self.images else {})},
        ]
        answer = ""
        for chunk in _stream_chat(
            {"model": self.model, "messages": messages, "options": self.options}
        ):
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            piece = chunk.get("message", {}).get("content", "")
            answer += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        self.messages += [messages[-1], {"role": "assistant", "content": answer}]
        self.images = []
        return answer

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        words = line.split(maxsplit=3)
        cmd = words[0]
        if cmd in ("/bye", "/exit"):
            return False
        if cmd in ("/?", "/help"):
            print(HELP)
        elif cmd == "/clear":
            self.messages = []
            print("Cleared session context")
        elif cmd == "/set" and len(words) >= 4 and words[1] == "parameter":
            self.options[words[2]] = _parse_value(words[2], words[3])
            print(f"Set parameter '{words[2]}' to '{words[3]}'")
        elif cmd == "/set" and len(words) >= 3 and words[1] == "system":
            self.system = line.split(maxsplit=2)[2]
            print("Set system message.")
        elif cmd == "/show":
            self._show(words[1] if len(words) > 1 else "info")
        elif cmd == "/image" and len(words) >= 2:
            path = line.split(maxsplit=1)[1]
            try:
                self.attach(path)
            except RuntimeError as e:
                print(f"Error: {e}", file=sys.stderr)
            else:
                print(f"Added image '{path}'")
        else:
            print(f"Unknown command '{cmd}'. Type /? for help")
        return True

    def _show(self, what: str) -> None:
        info = client.call("POST", "/api/show", {"model": self.model})
        if what == "info":
            d = info.get("details", {})
            print(f"  Model\n    architecture        {d.get('family', '')}")
            print(f"    parameters          {d.get('parameter_size', '')}")
            print(f"    quantization        {d.get('quantization_level', '')}")
            print(f"  Capabilities\n    {', '.join(info.get('capabilities', []))}")
        elif what == "parameters":
            print("\n".join(f"{k} {v}" for k, v in self.options.items()) or "No parameters set.")
        elif what == "system":
            print(self.system or "No system message was specified for this model.")
        elif what in ("template", "license"):
            print(info.get(what) or f"No {what} was specified for this model.")
        else:
            print(f"Unknown /show {what}")

    def attach(self, path: str) -> None:
        """Send the image file at `path` with the next message; RuntimeError when the model
        takes no images or the file cannot be read (the server checks what it holds)."""
        import base64

        caps = client.call("POST", "/api/show", {"model": self.model}).get("capabilities", [])
        if "vision" not in caps:
            raise RuntimeError(f"model {self.model!r} does not support images")
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as e:
            raise RuntimeError(f"{path}: {e.strerror or e}") from None
        self.images.append(base64.b64encode(data).decode())


def _parse_value(name: str, value: str) -> Any:
    if name == "stop":
        return [value]
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _read_message(first: str) -> str:
    """Multi-line input: \"\"\" ... \"\"\" or <<<EOF ... EOF (Ollama's and the spec's forms)."""
    if first.startswith('"""'):
        text = first[3:]
        if text.endswith('"""') and len(first) > 3:
            return text[:-3]
        lines = [text] if text else []
        while True:
            line = input("... ")
            if line.endswith('"""'):
                lines.append(line[:-3])
                return "\n".join(lines)
            lines.append(line)
    if first.startswith("<<<"):
        marker = first[3:].strip() or "EOF"
        lines = []
        while (line := input("... ")) != marker:
            lines.append(line)
        return "\n".join(lines)
    return first


def _history() -> None:
    try:
        import readline
    except ImportError:
        return
    from xllm.config import load_settings

    path = load_settings().home / "history"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)

    atexit.register(readline.write_history_file, path)


def _is_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.lower().endswith(".gguf")


def _from_file(value: str) -> str:
    """`xllm run ./m.gguf`: the file goes to the server as a blob (skipped when it has it) and
    becomes a model named after the file, as `xllm create` with `FROM ./m.gguf` would make."""
    from xllm.cli import models
    from xllm.cli.progress import Progress
    from xllm.models import names

    path = Path(value).expanduser()
    if not path.is_file():
        raise RuntimeError(f"{value}: no such file")
    name = names.name_for_path(path)
    progress = Progress()
    try:
        body = {"model": name, "files": models.upload_model(path, progress)}
        for record in client.stream("POST", "/api/create", body):
            progress.update(record)
    finally:
        progress.finish()
    return name


def _pull(model: str) -> None:
    from xllm.cli import models

    models.show_progress(client.stream("POST", "/api/pull", {"model": model}))


def _load(model: str) -> None:
    client.call("POST", "/api/chat", {"model": model, "messages": []}, timeout=600)


def prepare(model: str, interactive: bool) -> str:
    """The name to chat with, loaded: a local file is imported first, a missing model pulled
    (as `ollama run` does), and a stored model whose file is corrupt re-downloaded if the user
    agrees."""
    if _is_path(model):
        model = _from_file(model)
    try:
        _load(model)
    except client.HTTPStatus as e:
        if e.status == 404:
            _pull(model)
        elif "is corrupt" in str(e) and interactive and _confirm(f"{e}\nDownload it again?"):
            client.call("DELETE", "/api/delete", {"model": model})
            _pull(model)
        else:
            raise
        _load(model)
    return model


def _confirm(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def run(args: argparse.Namespace) -> int:
    session = Session(args.model)
    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read()
        prompt = f"{prompt}\n{piped}".strip() if prompt else piped.strip()
    try:
        session.model = prepare(args.model, interactive=sys.stdin.isatty())
        for path in args.image:
            session.attach(path)
        if prompt:
            session.ask(prompt)
            return 0
        _history()
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            if line.startswith("/"):
                if not session.command(line):
                    return 0
                continue
            session.ask(_read_message(line))
    except (client.NoServer, RuntimeError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 130
