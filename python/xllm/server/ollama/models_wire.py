"""Wire models of Ollama's model-management endpoints: pull, push, create, copy, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from xllm.server.ollama.wire import Wire

Name = Annotated[str, Field(max_length=512)]
_Text = Annotated[str, Field(max_length=4 << 20)]


class _Named(Wire):
    model: Name = ""
    name: Name = ""  # older clients

    def target(self) -> str:
        return self.model or self.name


class PushRequest(_Named):
    insecure: bool = False
    """Allow plain HTTP to a registry named by host."""
    stream: bool = True


class PullRequest(PushRequest):
    parts: (
        Annotated[
            dict[
                Annotated[str, Field(max_length=40)],
                Annotated[str, Field(min_length=1, max_length=1000)],
            ],
            Field(max_length=8),
        ]
        | None
    ) = None
    """xllm's: a diffusion model's files by part, from a Hugging Face repo (models/hub.py)."""


class DeleteRequest(_Named):
    pass


class CopyRequest(Wire):
    source: Annotated[str, Field(min_length=1, max_length=512)]
    destination: Annotated[str, Field(min_length=1, max_length=512)]


class CreateMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: _Text = ""


class CreateRequest(_Named):
    """The current ollama client's structured fields (and the older `modelfile` text)."""

    from_: Name | None = Field(default=None, alias="from")
    files: Annotated[dict[Name, Name], Field(max_length=64)] | None = None
    """File name -> digest of a blob uploaded with `POST /api/blobs/<digest>`."""
    adapters: Annotated[dict[Name, Name], Field(max_length=64)] | None = None
    template: _Text | None = None
    system: _Text | None = None
    parameters: dict[str, Any] | None = None
    messages: Annotated[list[CreateMessage], Field(max_length=1024)] | None = None
    license: _Text | Annotated[list[_Text], Field(max_length=64)] | None = None
    quantize: Annotated[str, Field(max_length=32)] | None = None
    modelfile: _Text | None = None
    stream: bool = True
