"""Reference forward passes in numpy (no torch) and tiny random-weight Hugging Face folders,
for checking what `xllm convert` writes against the model it came from."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

F = np.float32


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The F32 tensors of a safetensors file, read by hand (u64 header length, JSON header,
    data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name != "__metadata__" and t["dtype"] == "F32":
            a, b = t["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], "<f4").reshape(t["shape"])
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {}
    offset, blobs = 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


_erf = np.vectorize(math.erf)


def bert_embedding(w: dict[str, np.ndarray], config: dict[str, Any], ids: list[int]) -> np.ndarray:
    """BertModel.forward, then sentence-transformers' mean pooling and L2 normalization."""
    eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
    n = len(ids)
    e = "embeddings."
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:n]
    x = x + w[e + "token_type_embeddings.weight"][0]
    x = _layer_norm(x, w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def lin(name: str, v: np.ndarray, p: str = p) -> np.ndarray:
            return v @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (
            lin(f"attention.self.{t}", x).reshape(n, heads, -1).transpose(1, 0, 2)
            for t in ("query", "key", "value")
        )
        att = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])) @ v
        att = lin("attention.output.dense", att.transpose(1, 0, 2).reshape(n, -1))
        x = _layer_norm(
            x + att,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = lin("intermediate.dense", x)
        h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
        x = _layer_norm(
            x + lin("output.dense", h),
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def llama3_inv_freq(inv: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Hugging Face's `_compute_llama3_parameters`: low frequencies divided by the factor,
    high ones kept, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return np.where(medium, smoothed, scaled)


def _rope(x: np.ndarray, theta: float, scaling: dict[str, Any] | None = None) -> np.ndarray:
    """Hugging Face's rotary embedding (rotate_half: dimension i pairs with i + d/2)."""
    n, d = x.shape[1], x.shape[2]
    inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    if scaling is not None:
        inv = llama3_inv_freq(inv, scaling)
    ang = np.outer(np.arange(n), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def causal_logits(w: dict[str, np.ndarray], config: dict[str, Any], ids: list[int]) -> np.ndarray:
    """LlamaForCausalLM / Qwen2ForCausalLM forward: the logits of every position."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    eps, n = config["rms_norm_eps"], len(ids)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    x = w["model.embed_tokens.weight"][ids].astype(np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = lin(p + "self_attn.q_proj", h).reshape(n, heads, -1).transpose(1, 0, 2)
        k = lin(p + "self_attn.k_proj", h).reshape(n, kv, -1).transpose(1, 0, 2)
        v = lin(p + "self_attn.v_proj", h).reshape(n, kv, -1).transpose(1, 0, 2)
        scaling = config.get("rope_scaling")
        q, k = _rope(q, config["rope_theta"], scaling), _rope(k, config["rope_theta"], scaling)
        k, v = np.repeat(k, heads // kv, 0), np.repeat(v, heads // kv, 0)
        att = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]) + mask) @ v
        x = x + lin(p + "self_attn.o_proj", att.transpose(1, 0, 2).reshape(n, -1))
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = lin(p + "mlp.gate_proj", h)
        x = x + lin(p + "mlp.down_proj", gate / (1 + np.exp(-gate)) * lin(p + "mlp.up_proj", h))
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
          "Paris is the capital of France.", "numbers 1 22 333, symbols {}[]<>", "¿Qué tal? naïve café"] * 20  # fmt: skip


def tiny_causal(folder: Path, arch: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A random-weight llama or qwen2 Hugging Face folder: config.json (`extra` keys added),
    model.safetensors, a byte-level BPE tokenizer.json trained here, tokenizer_config.json
    with a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }))  # fmt: skip
    vocab, dim, ff, heads, kv, layers = tok.get_vocab_size(), 64, 128, 4, 2, 2
    config = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
              "vocab_size": vocab, "hidden_size": dim, "intermediate_size": ff, "num_attention_heads": heads,
              "num_key_value_heads": kv, "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "eos_token_id": 2, **extra}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, dim)),
                                "model.norm.weight": 1 + rng.normal(0, 0.1, dim),
                                "lm_head.weight": rng.normal(0, 0.2, (vocab, dim))}  # fmt: skip
    hd = dim // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * hd, dim), "self_attn.k_proj": (kv * hd, dim), "self_attn.v_proj": (kv * hd, dim),
                  "self_attn.o_proj": (dim, heads * hd), "mlp.gate_proj": (ff, dim), "mlp.up_proj": (ff, dim), "mlp.down_proj": (dim, ff)}  # fmt: skip
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 0.15, shape)
        if arch == "qwen2":
            for name in ("q_proj", "k_proj", "v_proj"):
                w[p + f"self_attn.{name}.bias"] = rng.normal(0, 0.1, shapes[f"self_attn.{name}"][0])
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, dim)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, dim)
    write_safetensors(folder / "model.safetensors", w)
    return config


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gemma3_logits(w: dict[str, np.ndarray], config: dict[str, Any], ids: list[int]) -> np.ndarray:
    """Gemma3ForCausalLM forward (text): norms by 1 + w, q/k norms, embeddings scaled by
    sqrt(hidden), the local rope base in sliding layers, four norms a layer, tied output."""
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    eps, n = config["rms_norm_eps"], len(ids)

    def rms(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 + g)

    embed = w["model.embed_tokens.weight"].astype(np.float64)
    x = embed[ids] * math.sqrt(config["hidden_size"])
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        theta = (
            config["rope_local_base_freq"] if kind == "sliding_attention" else config["rope_theta"]
        )
        h = rms(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv, hd)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv, hd).transpose(1, 0, 2)
        q = _rope(rms(q, w[p + "self_attn.q_norm.weight"]).transpose(1, 0, 2), theta)
        k = _rope(rms(k, w[p + "self_attn.k_norm.weight"]).transpose(1, 0, 2), theta)
        k, v = np.repeat(k, heads // kv, 0), np.repeat(v, heads // kv, 0)
        scale = config["query_pre_attn_scalar"] ** -0.5
        att = _softmax(q @ k.transpose(0, 2, 1) * scale + mask) @ v
        att = att.transpose(1, 0, 2).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = x + rms(att, w[p + "post_attention_layernorm.weight"])
        h = rms(x, w[p + "pre_feedforward_layernorm.weight"])
        act = _gelu_tanh(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + rms(
            act @ w[p + "mlp.down_proj.weight"].T, w[p + "post_feedforward_layernorm.weight"]
        )
    return rms(x, w["model.norm.weight"]) @ embed.T


GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def _gemma_tokenizer(folder: Path) -> int:
    """A Gemma-style tokenizer.json: BPE with byte fallback on `▁`-spaced text (no
    pre-tokenizer), `<0xNN>` byte tokens in the vocabulary, `<bos>` added; returns its size."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=GEMMA_SPECIAL + byte_tokens)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in byte_tokens]
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}}  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    }))  # fmt: skip
    return len(spec["model"]["vocab"])


def tiny_gemma3(folder: Path, seed: int = 0) -> dict[str, Any]:
    """A random-weight Gemma3ForCausalLM folder: six layers (five sliding, one global), a head
    size that is not hidden/heads, tied embeddings, a Gemma-style tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, dim, ff, heads, kv, hd, layers = _gemma_tokenizer(folder), 64, 128, 4, 2, 32, 6
    config = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": vocab,
              "hidden_size": dim, "intermediate_size": ff, "num_attention_heads": heads, "num_key_value_heads": kv,
              "head_dim": hd, "num_hidden_layers": layers, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
              "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": hd, "sliding_window": 512,
              "layer_types": ["sliding_attention"] * 5 + ["full_attention"], "max_position_embeddings": 1024,
              "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, dim)),
                                "model.norm.weight": rng.normal(0, 0.1, dim)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * hd, dim), "self_attn.k_proj": (kv * hd, dim), "self_attn.v_proj": (kv * hd, dim),
                  "self_attn.o_proj": (dim, heads * hd), "mlp.gate_proj": (ff, dim), "mlp.up_proj": (ff, dim), "mlp.down_proj": (dim, ff)}  # fmt: skip
        for name, shape in shapes.items():
            w[p + name + ".weight"] = rng.normal(0, 0.15, shape)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            w[p + name + ".weight"] = rng.normal(0, 0.1, dim)
        w[p + "self_attn.q_norm.weight"] = rng.normal(0, 0.1, hd)
        w[p + "self_attn.k_norm.weight"] = rng.normal(0, 0.1, hd)
    write_safetensors(folder / "model.safetensors", w)
    return config
