"""Type stub of the Rust extension `xllm._core` (checked by `mypy.stubtest xllm._core`)."""

from os import PathLike
from typing import Any, Final, Self, TypeAlias, TypedDict, final

__all__ = [
    "SSE_DONE",
    "Delta",
    "DeltaFramer",
    "Engine",
    "GzipStream",
    "QueueFull",
    "gzip_compress",
    "read_deltas",
    "read_gguf",
    "sse_event",
]

SSE_DONE: Final[bytes]

@final
class DeltaFramer:
    """Frames one streamed token as `data: <prefix><json text><suffix>\\n\\n`."""

    def __new__(cls, prefix: bytes, suffix: bytes) -> Self: ...
    def frame(self, text: str) -> bytes: ...

def sse_event(data: str, event: str | None = None) -> bytes:
    """One SSE event with an optional event name."""

@final
class GzipStream:
    """One gzip member written piece by piece; each write is flushed so nothing is held back."""

    def __new__(cls, level: int = 1) -> Self: ...
    def write(self, data: bytes) -> bytes: ...
    def finish(self) -> bytes:
        """The gzip trailer; later writes return nothing."""

def gzip_compress(data: bytes, level: int = 6) -> bytes:
    """gzip a whole body (runs without the GIL)."""

class QueueFull(RuntimeError):
    """Too many requests are waiting for this model."""

_TokenLogprob: TypeAlias = tuple[str, float, bytes, list[tuple[str, float, bytes]]]
"""A generated token's (text, logprob, bytes, [(text, logprob, bytes) of the likeliest])."""

@final
class Delta:
    """What happened to one choice of one request since the last poll.

    The Rust loop reports each generated token in `tokens` when it is sampled, and text when
    the stop matcher releases it: text that could begin a stop string comes with a later
    token's delta, and a stop string's tokens are reported though its text never is.
    """

    def __new__(
        cls,
        request: int = 0,
        choice: int = 0,
        text: str = "",
        *,
        tokens: list[int] | None = None,
        logprobs: list[_TokenLogprob] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        finish: str | None = None,
        usage: dict[str, int | float] | None = None,
        error: object = None,
    ) -> Self: ...
    @property
    def request(self) -> int:
        """The request id."""
    @property
    def choice(self) -> int:
        """The choice index; -1 with `finish`: ends every choice of the request."""
    @property
    def text(self) -> str: ...
    @property
    def tokens(self) -> list[int]:
        """The token ids generated (empty when none)."""
    @property
    def logprobs(self) -> list[_TokenLogprob] | None: ...
    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """Tool-call pieces, for engines that emit calls natively (never the Rust loop)."""
    @property
    def finish(self) -> str | None:
        """One of "stop", "length", "cancelled", "error"; None while the choice runs."""
    @property
    def usage(self) -> dict[str, int | float] | None:
        """On the finishing delta: prompt_tokens, cached_tokens, completion_tokens, ttft_ms,
        gen_ms (and accepted_prediction_tokens, rejected_prediction_tokens when it drafted)."""
    @property
    def error(self) -> object:
        """None, or why it failed: a str from the engine, or an `xllm.errors.XllmError` the
        server put there."""
    def __reduce__(self) -> tuple[Any, ...]: ...

class _GGUFHeader(TypedDict):
    version: int
    metadata: dict[str, Any]
    """Every key except arrays longer than `max_array_len` (see `arrays`)."""
    arrays: dict[str, tuple[str, int]]
    """(item type name, length) of every array, kept or not."""
    tensors: list[tuple[str, tuple[int, ...], int, int, int]]
    """(name, dims innermost first, ggml type, offset from `data_offset`, bytes)."""
    alignment: int
    data_offset: int
    file_size: int

def read_gguf(path: str | PathLike[str], max_array_len: int | None = None) -> _GGUFHeader:
    """Read and check a GGUF (v2/v3) header without reading tensor data or holding the GIL.

    ValueError names the defect and its byte offset; OSError when the file cannot be read.
    Arrays longer than `max_array_len` are checked but left out of `metadata`.
    """

def read_deltas(fd: int) -> list[Delta] | None:
    """Every delta a batching loop sent on the non-blocking SOCK_SEQPACKET socket `fd` and not
    yet read; None once the sender's end is closed and nothing is left."""

@final
class Engine:
    """Continuous-batching engine over one llama context made by llama-cpp-python.

    `ctx` and `vocab` (and a vision model's `mtmd_ctx`, a draft model's `draft_ctx`, and
    `adapters`) are integer addresses that must stay valid until `close()`. `adapters` are
    the model's own LoRA adapters: indices 0.. of the table `load_adapter` extends, and at
    scale 1 the set `kv_dir` keeps states of.
    """

    def __new__(
        cls,
        lib_path: str,
        lib_version: str,
        ctx: int,
        vocab: int,
        *,
        n_vocab: int,
        ctx_size: int,
        parallel: int,
        batch_size: int,
        max_queue: int,
        threads: int = 0,
        encoder_threads: int = 0,
        mtmd_lib: str | None = None,
        mtmd_ctx: int = 0,
        n_embd_inp: int = 0,
        speculation: bool = True,
        kv_dir: str | None = None,
        kv_max_bytes: int = 0,
        adapters: list[int] = ...,
        draft_ctx: int = 0,
    ) -> Self: ...
    def load_adapter(self, path: str) -> int:
        """Load the LoRA adapter at `path` over the model (kept until it is freed): the index a
        request's `lora` ((index, scale) pairs) names it by; ValueError when llama.cpp cannot."""
    def tokenize_media(
        self,
        text: str,
        images: list[tuple[int, int, bytes, str]],
        add_special: bool,
        parse_special: bool,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens of a prompt whose image markers stand for `images` ((width, height, rgb,
        digest)): -1 at image tokens, and each image's (start, length); ValueError on a
        mismatch. Each image's preprocessing is kept, by digest, for its encode."""
    def image_marker(self) -> str | None:
        """The text that stands for an image in a prompt; None without a projector."""
    def submit(
        self,
        request_id: int,
        prompt: list[int],
        params: dict[str, Any],
        images: list[tuple[int, int, str, int, int, bytes]] = ...,
    ) -> None:
        """Queue a generation; QueueFull when the queue is full, ValueError for bad input.
        `images`: (start, length, digest, width, height, rgb) of each image's -1 positions."""
    def cancel(self, request_id: int) -> None: ...
    def fileno(self) -> int:
        """Readable when `poll()` has events."""
    def poll(self) -> list[Delta]:
        """Every `Delta` since the last call."""
    def send_to(self, fd: int) -> None:
        """From now on the loop sends its deltas on the SOCK_SEQPACKET socket `fd` (it keeps a
        duplicate) for `read_deltas` at the other end, instead of keeping them for `poll()`."""
    def stats(self) -> dict[str, int]: ...
    def embed(
        self, ctx: int, inputs: list[list[int]], n_embd: int, normalize: bool
    ) -> list[list[float]]:
        """Pooled embeddings through a second context made with embeddings on."""
    def close(self) -> None:
        """Stop the loop; waiting and running requests end as "cancelled"."""
