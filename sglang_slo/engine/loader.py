"""Load and save models in HF format (config.json + safetensors, HF parameter names).

    model = load_model("dir", dtype=torch.float32, device="cpu")   # LlamaForCausalLM (ours)
    save_model(model, "out_dir", dtype=torch.bfloat16)             # transformers can load it

Reads `model.safetensors` or a sharded `model.safetensors.index.json`. HF's separate
q/k/v_proj and gate/up_proj tensors are packed into our fused `qkv_proj` / `gate_up_proj`
on load and split again on save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.model import LlamaForCausalLM

# HF sub-name -> (our fused sub-name, part index in the fused order)
_PACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _part_sizes(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "self_attn.qkv_proj":
        return [cfg.q_size, cfg.kv_size, cfg.kv_size]
    return [cfg.intermediate_size, cfg.intermediate_size]


def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Build our model from an HF directory. dtype None = the config's torch_dtype."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_pretrained(model_dir)
    dtype = dtype or _DTYPES[cfg.torch_dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.model.rotary_emb.build_tables(cfg, device)  # buffers were on meta
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                target, part = _our_name(name)
                if target is None:
                    continue  # e.g. rotary inv_freq buffers in old checkpoints
                if target == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if target not in params:
                    raise ValueError(f"{path.name}: unexpected tensor {name!r}")
                p = params[target]
                dst = p.data
                if part is not None:
                    sizes = _part_sizes(cfg, _fused_sub(target))
                    off = sum(sizes[:part])
                    dst = p.data[off:off + sizes[part]]
                    loaded.add(f"{target}#{part}")
                else:
                    loaded.add(target)
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected "
                                     f"{tuple(dst.shape)}")
                dst.copy_(tensor)
    expected = set()
    for n, p in model.named_parameters():
        if n == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        sub = _fused_sub(n)
        if sub is None:
            expected.add(n)
        else:
            expected.update(f"{n}#{i}" for i in range(len(_part_sizes(cfg, sub))))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{model_dir}: missing weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model.eval()


def save_model(model: LlamaForCausalLM, out_dir: str | Path,
               dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors with HF Llama/Qwen2 parameter names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = p.detach().to("cpu", dtype)
        sub = _fused_sub(name)
        if sub is None:
            tensors[name] = t.contiguous()
            continue
        hf_subs = [k for k, (fused, _) in _PACKED.items() if fused == sub]
        prefix, leaf = name.split(sub)
        for hf_sub, piece in zip(hf_subs, t.split(_part_sizes(cfg, sub))):
            tensors[f"{prefix}{hf_sub}{leaf}"] = piece.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    saved_cfg = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    saved_cfg.torch_dtype = {v: k for k, v in _DTYPES.items()}[dtype]
    saved_cfg.save(out_dir)


def _fused_sub(our_name: str) -> str | None:
    for sub in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
        if f".{sub}." in our_name:
            return sub
    return None


def _our_name(hf_name: str) -> tuple[str | None, int | None]:
    if "rotary_emb" in hf_name:
        return None, None
    for hf_sub, (fused, part) in _PACKED.items():
        if f".{hf_sub}." in hf_name:
            return hf_name.replace(hf_sub, fused), part
    return hf_name, None
