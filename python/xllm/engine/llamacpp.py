"""One model in llama.cpp, as the runner hosts it.

llama-cpp-python loads the model and creates the contexts (its ctypes structs track llama.h's
parameter structs exactly); `xllm._core.Engine` then drives the batching loop on that context
from a Rust thread, through the same libllama. Tokenizing and metadata stay here: they are
cheap calls made once per request.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc

from xllm import _core
from xllm.engine.options import EngineOptions, libllama_path, libmtmd_path, llama_cpp_version
from xllm.errors import InvalidRequest


class LlamaCppEngine:
    """A loaded model with its batching engine; the runner's only handle on llama.cpp."""

    def __init__(self, path: Path, options: EngineOptions) -> None:
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = options.gpu_layers
        if options.tensor_split:
            split = (ctypes.c_float * len(options.tensor_split))(*options.tensor_split)
            mparams.tensor_split = split  # kept alive by `split` until the load returns
        model = load_model(path, options.splits, mparams)
        self._model = model
        self._adapters = self._load_adapters(options.adapters)
        self._vocab = lc.llama_model_get_vocab(model)
        self._path = path
        self._options = options
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        self.n_embd = int(lc.llama_model_n_embd(model))
        self.n_layer = int(lc.llama_model_n_layer(model))
        self.n_params = int(lc.llama_model_n_params(model))
        self.model_size = int(lc.llama_model_size(model))
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.fim_tokens = _fim_tokens(self._vocab)
        self._metadata = self._read_metadata()
        ctx_size = min(options.ctx_size, self.n_ctx_train or options.ctx_size)
        batch = max(options.batch_size, options.parallel)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = ctx_size * options.parallel
        cparams.n_seq_max = options.parallel
        cparams.n_batch = cparams.n_ubatch = batch
        cparams.n_threads = cparams.n_threads_batch = options.resolved_threads()
        cparams.kv_unified = False  # each sequence owns ctx_size cells: no starvation
        cparams.no_perf = True
        ctx = lc.llama_init_from_model(model, cparams)
        if not ctx:
            lc.llama_model_free(model)
            raise RuntimeError(
                f"llama.cpp could not create a context of {ctx_size} tokens x "
                f"{options.parallel} sequences for {path} (out of memory?)"
            )
        self._ctx = ctx  # its adapters are the batching loop's to set, per adapter group
        _warm_up(model, ctx, self._vocab)
        self._loras: dict[tuple[str, int, int], int] = {}
        self._loras_lock = threading.Lock()
        self.ctx_size = min(ctx_size, int(lc.llama_n_ctx_seq(ctx)))
        self._embed_ctx: Any = None
        self._embed_lock = threading.Lock()
        self._mtmd: Any = None
        threads = options.resolved_threads()
        self._encoder_threads = max(1, threads // 2)
        self._draft: tuple[Any, Any] | None = None
        self.draft_size = 0
        if options.draft_path is not None:
            self._draft = self._load_draft(Path(options.draft_path), mparams, cparams)
        vision: dict[str, Any] = {}
        if options.projector is not None:
            self._mtmd = self._load_projector(Path(options.projector))
            vision = {
                "threads": threads,
                "encoder_threads": self._encoder_threads,
                "mtmd_lib": str(libmtmd_path()),
                "mtmd_ctx": _address(self._mtmd),
                "n_embd_inp": int(lc.llama_model_n_embd_inp(model)),
            }
        self._core = _core.Engine(
            str(libllama_path()),
            llama_cpp_version(),
            _address(ctx),
            _address(self._vocab),
            n_vocab=self.n_vocab,
            ctx_size=self.ctx_size,
            parallel=options.parallel,
            batch_size=batch,
            max_queue=options.max_queue,
            # a recurrent state cannot drop rejected draft tokens
            speculation=not (lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model)),
            adapters=[_address(a) for a in self._adapters],
            **vision,
            **self._kv_disk(path, options, model),
            draft_ctx=_address(self._draft[1]) if self._draft is not None else 0,
        )
        # the batching loop's surface, unchanged
        self.submit = self._core.submit
        self.cancel = self._core.cancel
        self.fileno = self._core.fileno
        self.poll = self._core.poll
        self.send_to = self._core.send_to
        self.stats = self._core.stats

    def _load_draft(self, path: Path, mparams: Any, cparams: Any) -> tuple[Any, Any]:
        """The draft model and its context (as many sequences and cells as the target's):
        ValueError, naming both, when it cannot draft for this model."""
        draft = self._options.draft_model or str(path)
        try:
            model = load_model(path, self._options.draft_splits, mparams)
        except ValueError:
            self._free()
            raise ValueError(f"llama.cpp could not load the draft model {draft!r}") from None
        problem = incompatible(self._vocab, lc.llama_model_get_vocab(model))
        if problem is None and (
            lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model)
        ):
            problem = "its cache cannot drop rejected draft tokens (recurrent or hybrid model)"
        ctx = lc.llama_init_from_model(model, cparams) if problem is None else None
        if not ctx:
            lc.llama_model_free(model)
            self._free()
            raise ValueError(
                f"the draft model {draft!r} cannot draft for it: "
                f"{problem or 'llama.cpp could not create its context (out of memory?)'}"
            )
        self.draft_size = int(lc.llama_model_size(model))
        return model, ctx

    def _kv_disk(self, path: Path, options: EngineOptions, model: Any) -> dict[str, Any]:
        """Where this model's KV state is saved, if it is: a folder named by the model file
        (path, size, time), its adapters and the llama.cpp version, since a saved state carries
        no model identity. Sliding-window and recurrent caches are not saved: their state
        cannot be cut back to the prefix a later prompt shares."""
        if options.kv_dir is None:
            return {}
        if (
            lc.llama_model_n_swa(model) > 0
            or lc.llama_model_is_recurrent(model)
            or lc.llama_model_is_hybrid(model)
        ):
            return {}
        files = [Path(path), *map(Path, options.splits), *map(Path, options.adapters)]
        identity = [llama_cpp_version()]
        for f in files:
            st = f.stat()
            identity.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
        digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:32]
        return {"kv_dir": str(Path(options.kv_dir) / digest), "kv_max_bytes": options.kv_max_bytes}

    @property
    def vision(self) -> bool:
        """Whether a projector is loaded: the model takes images."""
        return self._mtmd is not None

    def _load_projector(self, path: Path) -> Any:
        """libmtmd's context for a projector over this model (ValueError when it is none, or
        does not fit the model: llama.cpp's log, in the server's, says why).

        Its encodes run on the engine's encoder thread beside the decode loop, with half the
        threads: the loop decodes with the other half meanwhile, so streams go on.
        """
        from llama_cpp import mtmd_cpp

        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = self._options.gpu_layers != 0
        params.n_threads = self._encoder_threads
        params.print_timings = False
        ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), self._model, params)
        if not ctx:
            self._free()
            raise ValueError(
                f"llama.cpp could not load the projector {path} for this model (not a "
                "projector, or one made for a model of another embedding size)"
            )
        if not mtmd_cpp.mtmd_support_vision(ctx) or mtmd_cpp.mtmd_decode_use_mrope(ctx):
            mtmd_cpp.mtmd_free(ctx)
            self._free()
            raise ValueError(
                f"the projector {path} is not a vision projector xllm supports (audio-only "
                "and M-RoPE projectors such as Qwen-VL's are not)"
            )
        return ctx

    def tokenize_media(
        self, text: str, images: list[tuple[int, int, bytes, str]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens of a prompt whose image markers (`image_marker`) stand for `images`
        ((width, height, rgb, digest)): -1 for each image token, and each image's (start,
        length). ValueError when markers and images do not match."""
        return self._core.tokenize_media(text, images, True, True)

    @property
    def image_marker(self) -> str | None:
        return self._core.image_marker()

    def _load_adapters(self, paths: tuple[str, ...]) -> list[Any]:
        """LoRA adapters over the model (freed with it); ValueError naming one that fails."""
        adapters = []
        for p in paths:
            adapter = lc.llama_adapter_lora_init(self._model, p.encode())
            if not adapter:
                lc.llama_model_free(self._model)
                raise ValueError(f"llama.cpp could not load the LoRA adapter {p}")
            adapters.append(adapter)
        return adapters

    def load_adapter(self, path: str) -> int:
        """Load a LoRA adapter over the model (once: it is kept, and freed with the model);
        returns the index requests' `lora` name it by. The server checked it fits the model."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)  # a file replaced under its name is new
        with self._loras_lock:
            index = self._loras.get(key)
            if index is None:
                try:  # under the loop's lock: a decode may be sizing its graph by the adapters
                    index = self._core.load_adapter(path)
                except ValueError:
                    name = Path(path).name
                    message = f"lora: llama.cpp could not load the LoRA adapter {name}"
                    raise InvalidRequest(message, param="lora") from None
                self._loras[key] = index
            return index

    def _apply_adapters(self, ctx: Any) -> None:
        """The model's own adapters at scale 1 (the embeddings context's: it has no groups)."""
        if not self._adapters:
            return
        n = len(self._adapters)
        adapters = (lc.llama_adapter_lora_p_ctypes * n)(*self._adapters)
        scales = (ctypes.c_float * n)(*([1.0] * n))
        if lc.llama_set_adapters_lora(ctx, adapters, n, scales):
            raise RuntimeError("llama.cpp could not apply the model's LoRA adapters")

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(lc.llama_model_meta_count(self._model)):
            n = lc.llama_model_meta_key_by_index(self._model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", "replace")
            n = lc.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf))
            if n >= len(buf):  # long values (chat templates) need a bigger buffer
                big = ctypes.create_string_buffer(n + 1)
                lc.llama_model_meta_val_str_by_index(self._model, i, big, len(big))
                out[key] = big.value.decode("utf-8", "replace")
            elif n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def token_piece(self, token: int) -> bytes:
        return token_piece(self._vocab, token)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return tokenize(self._vocab, text, add_special, parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        arr = (lc.llama_token * len(tokens))(*tokens)
        size = len(tokens) * 8 + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n

    def grammar_parses(self, grammar: str) -> bool:
        """Whether llama.cpp accepts `grammar` (GBNF, top rule `root`), as the batching loop
        will parse it once the request's turn comes."""
        sampler = lc.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        lc.llama_sampler_free(sampler)
        return True

    def embed(self, inputs: list[list[int]], normalize: bool = True) -> list[list[float]]:
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise ValueError(f"input {i} is empty")
            if len(tokens) > self.ctx_size:
                raise ValueError(
                    f"input {i} is {len(tokens)} tokens, more than the context ({self.ctx_size})"
                )
        with self._embed_lock:
            if self._embed_ctx is None:
                self._embed_ctx = self._new_embed_ctx()
            return self._core.embed(_address(self._embed_ctx), inputs, self.n_embd, normalize)

    def _new_embed_ctx(self) -> Any:
        arch = self._metadata.get("general.architecture", "")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.ctx_size
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self._options.resolved_threads()
        cparams.embeddings = True
        # Embedding models declare their pooling; generative ones get the mean of their states.
        declared = f"{arch}.pooling_type" in self._metadata
        cparams.pooling_type = (
            lc.LLAMA_POOLING_TYPE_UNSPECIFIED if declared else lc.LLAMA_POOLING_TYPE_MEAN
        )
        ctx = lc.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create an embeddings context")
        self._apply_adapters(ctx)
        return ctx

    def close(self) -> None:
        """Stop the loop and the encoder, then free contexts and model (they must not touch
        them after)."""
        self._core.close()
        with self._embed_lock:
            if self._embed_ctx is not None:
                lc.llama_free(self._embed_ctx)
                self._embed_ctx = None
        if self._mtmd is not None:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_free(self._mtmd)
            self._mtmd = None
        if self._draft is not None:
            lc.llama_free(self._draft[1])
            lc.llama_model_free(self._draft[0])
            self._draft = None
        if self._ctx is not None:
            self._free()

    def _free(self) -> None:
        lc.llama_free(self._ctx)
        self._ctx = None
        lc.llama_model_free(self._model)


def _warm_up(model: Any, ctx: Any, vocab: Any) -> None:
    """llama-server's warm-up: one decode of BOS and EOS, then an empty cache, so the first
    request does not pay for what a context's first decode does once (the first use of its
    compute buffers and threads; this decode took ~25 ms for a 135M model on 2 cores).
    Every weight is read (every expert of a mixture, in warm-up mode), as the first request
    would."""
    if lc.llama_model_has_encoder(model) or not lc.llama_model_has_decoder(model):
        return  # an encoder's decoder needs the encoder's output first
    ids = [t for t in (lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab)) if t >= 0] or [0]
    tokens = (lc.llama_token * len(ids))(*ids)
    lc.llama_set_warmup(ctx, True)
    try:
        lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(ids)))
    finally:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        lc.llama_synchronize(ctx)
        lc.llama_set_warmup(ctx, False)


def load_model(path: Path, splits: Sequence[str], mparams: Any) -> Any:
    """A llama.cpp model from `path` (and the further files of a split model, in order, named
    explicitly: blobs in the store are not named as llama.cpp finds shards)."""
    if splits:
        files = [str(path).encode(), *(s.encode() for s in splits)]
        paths = (ctypes.c_char_p * len(files))(*files)
        model = lc.llama_model_load_from_splits(paths, len(files), mparams)
    else:
        model = lc.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ValueError(f"llama.cpp could not load {path}")
    return model


_VOCAB_CHECK_FROM = 5
"""llama-server's (common_speculative_are_compatible): the first tokens (control tokens of some
families) may differ."""


def incompatible(target: Any, draft: Any) -> str | None:
    """Why a draft model's vocabulary cannot draft for a target's (None: it can): the same
    kind, special tokens and token texts, as llama-server requires; and the same size (llama-server
    allows 128 more or fewer), since every draft token goes to the target as it is."""

    def specials(v: Any) -> tuple[int, ...]:
        return (
            lc.llama_vocab_type(v),
            lc.llama_vocab_bos(v),
            lc.llama_vocab_eos(v),
            lc.llama_vocab_get_add_bos(v),
            lc.llama_vocab_get_add_eos(v),
        )

    n = int(lc.llama_vocab_n_tokens(target))
    m = int(lc.llama_vocab_n_tokens(draft))
    if n != m:
        return f"their vocabularies have {n} and {m} tokens"
    if specials(target) != specials(draft):
        return "their vocabularies differ in kind or in their BOS/EOS tokens"
    for token in range(_VOCAB_CHECK_FROM, n):
        if lc.llama_vocab_get_text(target, token) != lc.llama_vocab_get_text(draft, token):
            return f"token {token} differs between their vocabularies"
    return None


def tokenize(vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    raw = text.encode("utf-8")
    size = len(raw) + 8
    while True:
        tokens = (lc.llama_token * size)()
        n = lc.llama_tokenize(vocab, raw, len(raw), tokens, size, add_special, parse_special)
        if n >= 0:
            return list(tokens[:n])
        size = -n


def token_piece(vocab: Any, token: int) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(n, 0)]


def _fim_tokens(vocab: Any) -> tuple[int, int, int] | None:
    """llama.cpp's fill-in-the-middle (prefix, suffix, middle) tokens; None without all three."""
    pre, suf, mid = (
        int(lc.llama_vocab_fim_pre(vocab)),
        int(lc.llama_vocab_fim_suf(vocab)),
        int(lc.llama_vocab_fim_mid(vocab)),
    )
    return (pre, suf, mid) if min(pre, suf, mid) >= 0 else None


def _address(ptr: Any) -> int:
    """The integer address of a ctypes pointer from llama-cpp-python."""
    value = ctypes.cast(ptr, ctypes.c_void_p).value
    if not value:
        raise RuntimeError("null llama.cpp handle")
    return int(value)
