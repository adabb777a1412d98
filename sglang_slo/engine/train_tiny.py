"""`sglang-slo train-tiny`: train a tiny target/draft Llama pair on the Python stdlib sources.

Writes, under `--out DIR`:
    DIR/target/  config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    DIR/draft/   the same for the draft
    DIR/manifest.json  command, seed, shapes, steps, seconds, val losses, greedy acceptance

Deterministic for a seed and step counts (single thread, fixed data order). `--target-secs`
/ `--draft-secs` cap wall time; when a cap stops training early the manifest records the
steps actually run, and `--target-steps N --draft-steps M` reproduces the same weights.

The draft is distilled from the target (0.3 cross-entropy + 0.7 KL(target || draft)).
With `--distill-steps N` a second stage fine-tunes it on the target's own greedy and sampled
continuations (`distill_draft.py`; the base draft stays in DIR/draft-base). `--from-pair DIR`
runs only that stage, starting from the base pair of an earlier run (hash-checked), so the
committed draft is reproducible in minutes from the committed target and draft-base.
`ensure_tiny_pair()` returns the committed pair in `sglang_slo/assets/tiny/` (training one
only when it is missing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sglang_slo.engine.attention import AttentionBatch, SequenceInput
from sglang_slo.engine.config import ModelConfig
from sglang_slo.engine.distill_draft import DistillSettings, distill, distill_sequences
from sglang_slo.engine.kv_cache import KVCache, blocks_needed
from sglang_slo.engine.loader import load_model, save_model
from sglang_slo.engine.model import LlamaForCausalLM
from sglang_slo.engine.tokenizer import Tokenizer, read_texts, stdlib_text_files

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"
CONTEXT = 256  # tokens, max_position_embeddings of both models


@dataclass(slots=True)
class TrainSettings:
    """Optimisation settings of one model."""

    steps: int
    """Optimizer steps (the LR schedule spans them)."""
    max_secs: float | None
    """Wall-clock cap, seconds; None = run all steps."""
    batch_size: int = 8
    """Windows per step."""
    seq_len: int = CONTEXT
    """Tokens per window."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), after a linear warm-up, cosine decay to 10%."""
    warmup: int = 30
    """Warm-up steps."""


def target_config(vocab_size: int, bos: int, eos: int) -> ModelConfig:
    """6 layers x 192 wide, GQA 6/2 heads of 32: ~2.8M parameters."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
                       num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                       max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                       rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=bos,
                       eos_token_ids=(eos,))


def draft_config(vocab_size: int, bos: int, eos: int) -> ModelConfig:
    """1 layer x 128 wide, GQA 4/2 heads of 32: ~0.45M parameters."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=CONTEXT, tie_word_embeddings=True,
                       rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=bos,
                       eos_token_ids=(eos,))


def build_corpus(tok: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, val): every 20th file is validation; files joined by eos."""
    streams: tuple[list[int], list[int]] = ([], [])
    for i, ids in enumerate(tok.encode_batch(texts)):
        streams[i % 20 == 19].extend([*ids, tok.eos_token_id])
    return torch.tensor(streams[0], dtype=torch.int64), torch.tensor(streams[1], dtype=torch.int64)


def new_model(cfg: ModelConfig, seed: int) -> LlamaForCausalLM:
    """Model with N(0, 0.02) weights (output projections scaled by depth), deterministic."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(
                ("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    return model


def train(model: LlamaForCausalLM, data: torch.Tensor, s: TrainSettings, seed: int,
          teacher: LlamaForCausalLM | None = None, log=print) -> dict:
    """AdamW on random windows of `data`; distil from `teacher` if given. Returns stats."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95))
    model.train()
    t0, step, loss_val = time.perf_counter(), 0, float("nan")
    while step < s.steps:
        if s.max_secs is not None and time.perf_counter() - t0 > s.max_secs:
            break
        lr = s.lr * min(1.0, (step + 1) / s.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / s.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, data.numel() - s.seq_len - 1, (s.batch_size,), generator=gen)
        window = torch.stack([data[i:i + s.seq_len + 1] for i in starts.tolist()])
        x, y = window[:, :-1], window[:, 1:]
        logits = model.logits(model.forward_dense(x))          # [B, L, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if teacher is not None:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher.logits(teacher.forward_dense(x)), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True,
                          reduction="batchmean") / s.seq_len
            loss = 0.3 * loss + 0.7 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_val = float(loss.detach())
        if step % 50 == 0 or step == 1:
            log(f"  step {step}/{s.steps} loss {loss_val:.3f} lr {lr:.2e} "
                f"{time.perf_counter() - t0:.0f}s")
    model.eval()
    return {"steps": step, "secs": round(time.perf_counter() - t0, 1),
            "final_train_loss": round(loss_val, 4)}


@torch.no_grad()
def val_loss(model: LlamaForCausalLM, val: torch.Tensor, seq_len: int = CONTEXT,
             windows: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) over evenly spaced validation windows."""
    stride = (val.numel() - seq_len - 1) // windows
    x = torch.stack([val[i * stride:i * stride + seq_len + 1] for i in range(windows)])
    total = 0.0
    for chunk in x.split(8):
        logits = model.logits(model.forward_dense(chunk[:, :-1]))
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())) * len(chunk)
    return total / windows


@torch.inference_mode()
def greedy_generate(model: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int,
                    block_size: int = 16) -> list[list[int]]:
    """Greedy continuation of every prompt, batched, through the paged serving forward."""
    cfg = model.config
    per_seq = blocks_needed(max(map(len, prompts)) + new_tokens, block_size)
    kv = KVCache.for_model(cfg, per_seq * len(prompts), block_size,
                           dtype=next(model.parameters()).dtype)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    ctx = [0] * len(prompts)
    pending = [list(p) for p in prompts]  # tokens not yet in the cache
    for _ in range(new_tokens):
        batch = AttentionBatch.build([SequenceInput(t, c, len(p))
                                      for t, c, p in zip(tables, ctx, pending)], block_size)
        ids = torch.tensor([t for p in pending for t in p])
        hidden = model.forward(ids, batch.positions, batch, kv)
        nxt = model.logits(hidden[batch.last_rows]).argmax(-1).tolist()
        for i, tok in enumerate(nxt):
            ctx[i] += len(pending[i])
            pending[i] = [tok]
            seqs[i].append(tok)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


@torch.no_grad()
def greedy_acceptance(target: LlamaForCausalLM, draft: LlamaForCausalLM, val: torch.Tensor,
                      num_prompts: int = 32, prompt_len: int = 32, new_tokens: int = 64,
                      depth: int = 6) -> dict:
    """Greedy chain speculation statistics of draft vs target on validation prompts.

    Along the target's greedy continuation, position t "agrees" when the draft's argmax
    given the same prefix equals the target's token. With greedy verification a depth-d
    chain accepts the run of agreements (capped at d) plus the target's bonus token.
    """
    stride = (val.numel() - prompt_len) // num_prompts
    prompts = [val[i * stride:i * stride + prompt_len].tolist() for i in range(num_prompts)]
    outs = greedy_generate(target, prompts, new_tokens)
    full = torch.tensor([p + o for p, o in zip(prompts, outs)])
    draft_pred = draft.logits(draft.forward_dense(full[:, :-1])).argmax(-1)[:, prompt_len - 1:]
    agree = (draft_pred == full[:, prompt_len:])                    # [prompts, new_tokens]
    per_pos = [0, 0] * depth
    verifies = emitted = 0
    for row in agree.tolist():
        t = 0
        while t < len(row):
            k = 0
            while k < depth and t + k < len(row) and row[t + k]:
                per_pos[2 * k] += 1
                per_pos[2 * k + 1] += 1
                k += 1
            if k < depth and t + k < len(row):
                per_pos[2 * k + 1] += 1  # reached position k and was rejected there
            verifies += 1
            emitted += min(k + 1, len(row) - t)
            t += k + 1
    return {"agreement": round(float(agree.float().mean()), 4),
            "conditional_acceptance_by_depth": [
                round(per_pos[2 * k] / per_pos[2 * k + 1], 4) if per_pos[2 * k + 1] else None
                for k in range(depth)],
            "depth": depth,
            "tokens_per_verify": round(emitted / verifies, 3),
            "prompts": num_prompts, "new_tokens": new_tokens}


def weights_sha256(model_dir: str | Path) -> str:
    """Hash of model.safetensors (identifies a trained model)."""
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory (target/, draft/, manifest.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order")
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--target-steps", type=int, default=250, help="target optimizer steps")
    parser.add_argument("--draft-steps", type=int, default=200, help="draft optimizer steps")
    parser.add_argument("--target-secs", type=float, default=None,
                        help="wall-clock cap for the target, seconds (makes runs machine-dependent)")
    parser.add_argument("--draft-secs", type=float, default=None, help="cap for the draft, seconds")
    parser.add_argument("--batch-size", type=int, default=8, help="windows of 256 tokens per step")
    parser.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="dtype of the saved weights")
    parser.add_argument("--max-corpus-bytes", type=int, default=None,
                        help="use only the first N bytes of stdlib text (quick runs)")
    d = DistillSettings(steps=0)
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="fine-tune the draft on the target's own continuations for N steps (0 = off)")
    parser.add_argument("--distill-prompts", type=int, default=d.prompts, help="target continuations generated")
    parser.add_argument("--distill-new-tokens", type=int, default=d.new_tokens, help="tokens per continuation")
    parser.add_argument("--distill-sampled-fraction", type=float, default=d.sampled_fraction,
                        help="share of continuations sampled at T=1 (rest greedy)")
    parser.add_argument("--distill-hard-weight", type=float, default=d.hard_weight,
                        help="weight of CE to the target's argmax (rest: KL to the target)")
    parser.add_argument("--distill-lr", type=float, default=d.lr, help="peak learning rate of the stage")
    parser.add_argument("--from-pair", default=None, metavar="DIR",
                        help="skip base training: start the distill stage from DIR's base pair "
                             "(target/ and draft-base/ or draft/, checked against DIR/manifest.json)")


def _base_pair(args, out: Path, tok: Tokenizer, texts: list[str], train_ids: torch.Tensor,
               val_ids: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
    """Train target, then draft (distilled from the target by KL on stdlib windows) into
    `out`; returns (manifest, models reloaded from what was saved)."""
    manifest: dict = {
        "command": shlex.join(sys.argv),
        "seed": args.seed, "vocab_size": tok.vocab_size, "context": CONTEXT,
        "save_dtype": args.save_dtype, "python_stdlib_files": len(texts),
        "train_tokens": train_ids.numel(), "val_tokens": val_ids.numel(),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    models = {}
    for role, cfg_fn, steps, secs, teacher_role, seed in (
            ("target", target_config, args.target_steps, args.target_secs, None, args.seed),
            ("draft", draft_config, args.draft_steps, args.draft_secs, "target", args.seed + 1)):
        cfg = cfg_fn(tok.vocab_size, tok.bos_token_id, tok.eos_token_id)
        model = new_model(cfg, seed)
        settings = TrainSettings(steps=steps, max_secs=secs, batch_size=args.batch_size,
                                 lr=2e-3 if role == "target" else 3e-3)
        print(f"{role}: {cfg.num_parameters / 1e6:.2f}M params, {settings}")
        stats = train(model, train_ids, settings, seed,
                      teacher=models.get(teacher_role) if teacher_role else None)
        save_model(model, out / role, dtype=dtype)
        tok.save(out / role, model_max_length=CONTEXT)
        models[role] = load_model(out / role, dtype=torch.float32)  # evaluate what was saved
        stats.update(val_loss=round(val_loss(models[role], val_ids), 4),
                     params=cfg.num_parameters, settings=asdict(settings),
                     config={k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"},
                     sha256=weights_sha256(out / role))
        manifest[role] = stats
        print(f"{role}: {stats['steps']} steps in {stats['secs']}s, val loss {stats['val_loss']}")
    manifest["reproduce"] = (f"sglang-slo train-tiny --out {out} --seed {args.seed} "
                             f"--vocab-size {args.vocab_size} --batch-size {args.batch_size} "
                             f"--target-steps {manifest['target']['steps']} "
                             f"--draft-steps {manifest['draft']['steps']} "
                             f"--save-dtype {args.save_dtype}"
                             + (f" --max-corpus-bytes {args.max_corpus_bytes}"
                                if args.max_corpus_bytes else ""))
    return manifest, models


def _load_base_pair(base: Path, out: Path) -> tuple[dict, dict]:
    """The base pair of an earlier run (its manifest, target/, and draft-base/ or draft/),
    checked against the manifest's hashes and copied into `out`."""
    manifest = json.loads((base / "manifest.json").read_text())
    draft_dir = base / "draft-base" if (base / "draft-base").is_dir() else base / "draft"
    want = {"target": manifest["target"]["sha256"],
            "draft": manifest["draft"].get("base_sha256", manifest["draft"]["sha256"])}
    for role, d in (("target", base / "target"), ("draft", draft_dir)):
        if weights_sha256(d) != want[role]:
            raise ValueError(f"{d}/model.safetensors does not match the base {role} of "
                             f"{base}/manifest.json (sha256 {want[role][:12]}...)")
    for role, d in (("target", base / "target"), ("draft", draft_dir)):
        (out / role).mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            if (d / f).is_file():
                shutil.copyfile(d / f, out / role / f)
        if not (out / role / "tokenizer.json").is_file():  # draft-base may share the target's
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(base / "target" / f, out / role / f)
    for k in ("distill", "base_greedy_acceptance", "reproduce_from_base"):
        manifest.pop(k, None)
    if "base_sha256" in manifest["draft"]:  # undo the distilled draft's entries
        d = manifest["draft"]
        d["sha256"], d["val_loss"] = d.pop("base_sha256"), d.pop("base_val_loss")
    models = {role: load_model(out / role, dtype=torch.float32) for role in ("target", "draft")}
    return manifest, models


def _distill_settings(args) -> DistillSettings:
    return DistillSettings(steps=args.distill_steps, prompts=args.distill_prompts,
                           new_tokens=args.distill_new_tokens,
                           sampled_fraction=args.distill_sampled_fraction,
                           hard_weight=args.distill_hard_weight, lr=args.distill_lr,
                           batch_size=args.batch_size)


def _distill_flags(args) -> str:
    return (f" --distill-steps {args.distill_steps} --distill-prompts {args.distill_prompts}"
            f" --distill-new-tokens {args.distill_new_tokens}"
            f" --distill-sampled-fraction {args.distill_sampled_fraction}"
            f" --distill-hard-weight {args.distill_hard_weight} --distill-lr {args.distill_lr}")


def _distill_stage(args, out: Path, manifest: dict, models: dict, tok: Tokenizer,
                   train_ids: torch.Tensor, val_ids: torch.Tensor, dtype: torch.dtype) -> None:
    """Fine-tune the draft on the target's own continuations (distill_draft.py); the base
    draft is kept in out/draft-base."""
    s = _distill_settings(args)
    seed = args.seed + 2
    print(f"distill: {s}")
    manifest["base_greedy_acceptance"] = greedy_acceptance(models["target"], models["draft"], val_ids)
    if (out / "draft-base").exists():
        shutil.rmtree(out / "draft-base")
    shutil.copytree(out / "draft", out / "draft-base")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # shared with target/
        (out / "draft-base" / f).unlink(missing_ok=True)
    seqs = distill_sequences(models["target"], train_ids, s, seed)
    stats = distill(models["draft"], models["target"], seqs, s, seed)
    save_model(models["draft"], out / "draft", dtype=dtype)
    tok.save(out / "draft", model_max_length=CONTEXT)
    models["draft"] = load_model(out / "draft", dtype=torch.float32)
    d = manifest["draft"]
    d["base_sha256"], d["base_val_loss"] = d["sha256"], d["val_loss"]
    d["sha256"] = weights_sha256(out / "draft")
    d["val_loss"] = round(val_loss(models["draft"], val_ids), 4)
    manifest["distill"] = {**stats, "settings": asdict(s), "seed": seed,
                           "sequences": list(seqs.shape)}
    print(f"distill: {stats}, draft val loss {d['base_val_loss']} -> {d['val_loss']}")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    out = Path(args.out)
    t_start = time.perf_counter()
    if args.from_pair and not args.distill_steps:
        print("--from-pair only makes sense with --distill-steps N", file=sys.stderr)
        return 1
    if args.distill_steps:
        try:
            s = _distill_settings(args)
        except ValueError as e:
            print(f"distill settings: {e}", file=sys.stderr)
            return 1
        if s.prompt_len + s.new_tokens > CONTEXT:
            print(f"--distill-new-tokens {s.new_tokens} + prompt {s.prompt_len} exceeds the context "
                  f"{CONTEXT}", file=sys.stderr)
            return 1
    texts = read_texts(stdlib_text_files(), args.max_corpus_bytes)
    if not texts:
        print("no Python stdlib sources found", file=sys.stderr)
        return 1
    tok = Tokenizer.load(Path(args.from_pair) / "target") if args.from_pair else Tokenizer.train(texts, args.vocab_size)
    train_ids, val_ids = build_corpus(tok, texts)
    if val_ids.numel() < 2 * CONTEXT or train_ids.numel() < 4 * CONTEXT:
        print(f"corpus too small: {train_ids.numel()} train / {val_ids.numel()} val tokens "
              f"(raise --max-corpus-bytes)", file=sys.stderr)
        return 1
    print(f"corpus: {len(texts)} files, {train_ids.numel()} train / {val_ids.numel()} val tokens, "
          f"tokenizer {time.perf_counter() - t_start:.1f}s")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.save_dtype]
    if args.from_pair:
        try:
            manifest, models = _load_base_pair(Path(args.from_pair), out)
        except (OSError, KeyError, ValueError) as e:
            print(f"--from-pair {args.from_pair}: {e}", file=sys.stderr)
            return 1
    else:
        manifest, models = _base_pair(args, out, tok, texts, train_ids, val_ids, dtype)
    if args.distill_steps:
        base_reproduce = manifest["reproduce"].split(" --distill-steps")[0]
        _distill_stage(args, out, manifest, models, tok, train_ids, val_ids, dtype)
        manifest["reproduce"] = (f"sglang-slo train-tiny --out {out} --seed"
                                 + base_reproduce.split(" --seed", 1)[1] + _distill_flags(args))
        manifest["reproduce_from_base"] = (
            f"sglang-slo train-tiny --out {out} --from-pair BASE_DIR --seed {args.seed}"
            f" --batch-size {args.batch_size} --save-dtype {args.save_dtype}" + _distill_flags(args)
            + (f" --max-corpus-bytes {args.max_corpus_bytes}" if args.max_corpus_bytes else "")
            + "   # BASE_DIR: a pair from the base command (draft-base/ or draft/), e.g. this directory")
        manifest["command"] = shlex.join(sys.argv)
    manifest["greedy_acceptance"] = greedy_acceptance(models["target"], models["draft"], val_ids)
    manifest["total_secs"] = round(time.perf_counter() - t_start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"out": str(out), "target_val_loss": manifest["target"]["val_loss"],
                      "draft_val_loss": manifest["draft"]["val_loss"],
                      **manifest["greedy_acceptance"], "total_secs": manifest["total_secs"]}))
    return 0


def ensure_tiny_pair(directory: str | Path | None = None, **train_overrides) -> Path:
    """Directory with target/ and draft/ ready to load.

    Returns `directory` if it already holds a pair; else, with no directory given, the
    committed pair in sglang_slo/assets/tiny; else trains one into `directory`
    (defaults of `train-tiny`, overridable, e.g. target_steps=50).
    """
    def complete(d: Path) -> bool:
        return all((d / r / f).is_file() for r in ("target", "draft")
                   for f in ("config.json", "model.safetensors", "tokenizer.json"))

    if directory is None:
        if complete(ASSET_DIR):
            return ASSET_DIR
        raise FileNotFoundError(f"no committed tiny pair in {ASSET_DIR}; "
                                f"run `sglang-slo train-tiny --out DIR`")
    d = Path(directory)
    if complete(d):
        return d
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(d)])
    for k, v in train_overrides.items():
        setattr(args, k, v)
    if run(args) != 0:
        raise RuntimeError("training the tiny pair failed")
    return d
