"""Model configuration for Llama-family decoders, read from and written to HF `config.json`.

Supported architectures: `LlamaForCausalLM` and `Qwen2ForCausalLM` (same math; Qwen2 adds a
bias to the q/k/v projections). Only the fields the forward needs are kept.

    cfg = ModelConfig.from_pretrained("path/to/model_dir")   # reads config.json
    cfg.to_hf_dict()                                          # dict for config.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(slots=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder-only model."""

    vocab_size: int
    """Number of token ids (embedding rows, logits columns)."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads per layer."""
    num_key_value_heads: int
    """Key/value heads per layer (GQA); divides num_attention_heads."""
    head_dim: int = 0
    """Per-head width; 0 means hidden_size // num_attention_heads."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """HF rope_scaling dict; only rope_type "llama3" (and "default"/None) is supported."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm."""
    max_position_embeddings: int = 2048
    """Longest sequence (prompt + output) the model accepts, tokens."""
    tie_word_embeddings: bool = False
    """lm_head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (always true for Qwen2)."""
    architecture: str = "LlamaForCausalLM"
    """HF architecture name written back to config.json."""
    bos_token_id: int | None = None
    """Begin-of-sequence token id, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in ("float32", "bfloat16", "float16")."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other config.json keys, preserved on save (model_type-specific extras)."""

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {SUPPORTED_ARCHITECTURES}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported torch_dtype {self.torch_dtype!r}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)

    @property
    def q_size(self) -> int:
        """Width of all query heads together."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of all key (or value) heads together."""
        return self.num_key_value_heads * self.head_dim

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * f + 2 * h
        emb = self.vocab_size * h
        return emb * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from the parsed contents of an HF config.json."""
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
                 "rope_scaling", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "architectures", "bos_token_id",
                 "eos_token_id", "torch_dtype", "dtype", "model_type", "rope_parameters"}
        rope_scaling = d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        params = d.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(d.get("head_dim") or 0),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            architecture=arch,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """Contents of an HF config.json that transformers can load."""
        qwen = self.architecture == "Qwen2ForCausalLM"
        d: dict[str, Any] = dict(self.extra)
        eos: int | list[int] | None = None
        if self.eos_token_ids:
            eos = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        d.update(
            architectures=[self.architecture],
            model_type="qwen2" if qwen else "llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            torch_dtype=self.torch_dtype,
        )
        if not qwen:
            d.update(attention_bias=self.attention_bias, mlp_bias=False)
        return d

    def save(self, model_dir: str | Path) -> None:
        """Write `model_dir/config.json`."""
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
