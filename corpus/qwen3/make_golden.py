#!/usr/bin/env python3
"""Golden data for vkdecode's Qwen3 CPU reference, from HF transformers (an independent
implementation).

Writes one directory per fixture under corpus/qwen3/ (next to this script):

    config.json                      as transformers writes it (one fixture rewritten to the
                                     legacy keys real checkpoints carry: rope_theta, torch_dtype)
    model.safetensors                or shards + model.safetensors.index.json
    logits.safetensors               tensor "logits", f32 [T, vocab]: the teacher-forced logits of
                                     one forward over prompt + generated ids (T rows; row t
                                     predicts token t + 1 from ids[0..=t])
    golden.json                      prompt ids, greedy ids, margins, versions, how it was made

Every number comes from the checkpoint as written to disk and read back with
`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation="eager")`:
16-bit weights are widened to f32 and everything is computed in f32 on the CPU. Greedy tokens come
from `generate(do_sample=False)` (prefill, then one token at a time with a KV cache), the logits
from a separate full forward; the script checks that both agree on every generated token.

Fixtures (ANCHORS.md, "Golden data from transformers: what was learned"):
- untied-rmsnorm: random, untied, heads * head_dim != hidden, RMSNorm weights 1 + 0.2 N(0, 1),
  f32 weights, legacy config keys. Typical bugs change its greedy tokens.
- trained-bytes: tied, trained on the CPU (700 steps of 32 x 128 bytes; 20 minutes on two busy
  cores here) on the English text of Python's `pydoc_data.topics` with a byte vocabulary
  (id = byte value), f16 weights, sharded checkpoint (3 shards + index). Median margin about 1.5
  and readable output.
- gqa4-hd128-long: random, untied, GQA ratio 4 (8 query / 2 kv heads), head_dim 128, a 320-token
  prompt (long caches, split-K), bf16 weights.

Usage: python corpus/qwen3/make_golden.py [--only NAME ...]
Needs: pip install torch transformers safetensors numpy (CPU is enough). Seeded and deterministic
(the trained fixture is deterministic for a given torch build and thread count; both are recorded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

HERE = Path(__file__).resolve().parent
THREADS = 2


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "torch_threads": THREADS,
    }


def qwen3_config(**kw) -> Qwen3Config:
    base = dict(
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=4096,
        attention_bias=False,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(kw)
    return Qwen3Config(**base)


def randomize(model: Qwen3ForCausalLM, seed: int) -> None:
    """Weights that make every part of the forward matter: embeddings N(0, 1), each linear
    N(0, 1/fan_in) (activations stay O(1), attention logits O(1), so the softmax is neither flat
    nor one-hot), every RMSNorm weight 1 + 0.2 N(0, 1) (so ignoring it, or using 1 + w, shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # [out, in] linear
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def training_text() -> tuple[bytes, dict]:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics)).encode("utf-8")
    return text, {
        "source": "pydoc_data.topics.topics (Python's own documentation topics), values of sorted keys "
        "stripped and joined with blank lines, UTF-8",
        "python": platform.python_version(),
        "bytes": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
    }


def train(model: Qwen3ForCausalLM, data: bytes, seed: int, steps: int, batch: int, seq: int, lr: float) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor(list(data), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)),
    )
    model.train()
    t0 = time.time()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return {
        "steps": steps,
        "batch": batch,
        "seq_len": seq,
        "lr": lr,
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.01), 5% linear warm-up, cosine decay, clip 1.0",
        "seed": seed,
        "seconds": round(time.time() - t0, 1),
        "final_loss_nats_per_byte": round(float(np.mean(losses[-50:])), 4),
    }


def to_legacy_config(path: Path) -> None:
    """Rewrites a transformers-5 config.json to the keys real Qwen3 checkpoints carry."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def golden(out: Path, prompt: list[int], new_tokens: int) -> dict:
    """Reloads the checkpoint from `out` and records greedy ids, teacher-forced logits, margins."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert type(model).__name__ == "Qwen3ForCausalLM", type(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    input_ids = torch.tensor([prompt], dtype=torch.long)
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=None,
        pad_token_id=0,
        num_beams=1,
    )
    with torch.no_grad():
        seq = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_cfg)
        generated = seq[0, len(prompt) :].tolist()
        assert len(generated) == new_tokens, len(generated)
        all_ids = torch.tensor([prompt + generated], dtype=torch.long)
        logits = model(all_ids).logits[0].float().contiguous()
    safetensors.torch.save_file({"logits": logits}, out / "logits.safetensors")

    # Margins of the steps that chose the generated tokens: rows len(prompt) - 1 .. T - 2.
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + new_tokens]
    top2 = rows.topk(2, dim=-1)
    argmax = top2.indices[:, 0].tolist()
    assert argmax == generated, f"teacher-forced argmax {argmax} != generated {generated}"
    margins = (top2.values[:, 0] - top2.values[:, 1]).tolist()
    all_top2 = logits.topk(2, dim=-1).values
    inv_freq = model.model.rotary_emb.inv_freq.float().tolist()
    return {
        "prompt_ids": prompt,
        "generated_ids": generated,
        "logits": {
            "file": "logits.safetensors",
            "tensor": "logits",
            "shape": list(logits.shape),
            "rows": "row t: logits after ids[0..=t] of prompt_ids + generated_ids (one teacher-forced forward)",
        },
        "generated_margins": margins,
        "generated_margin_min": min(margins),
        "generated_margin_median": float(np.median(margins)),
        "all_rows_margin_min": float((all_top2[:, 0] - all_top2[:, 1]).min()),
        "max_abs_logit": float(logits.abs().max()),
        "rope_inv_freq": inv_freq,
        "compute": "from_pretrained(dtype=torch.float32, attn_implementation='eager'), CPU; "
        "generate(do_sample=False) with its default dynamic KV cache",
    }


def write_fixture(name: str, model: Qwen3ForCausalLM, dtype: torch.dtype, meta: dict, prompt, new_tokens, **save_kw):
    out = HERE / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.to(dtype).save_pretrained(out, **save_kw)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    if meta.pop("legacy_config", False):
        to_legacy_config(out / "config.json")
    record = {"fixture": name, **meta, "weights_dtype": str(dtype).removeprefix("torch."), "versions": versions()}
    record.update(golden(out, prompt, new_tokens))
    (out / "golden.json").write_text(json.dumps(record, indent=1) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{name}: {size / 1024:.0f} KiB, margins min {record['generated_margin_min']:.4g} "
        f"median {record['generated_margin_median']:.4g}",
        flush=True,
    )


def untied_rmsnorm() -> None:
    seed = 1
    cfg = qwen3_config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    randomize(model, seed)
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(seed + 1000)).tolist()
    meta = {
        "description": "random, untied, 4 heads x 32 != hidden 64, GQA 2, RMSNorm weights 1 + 0.2 N(0,1), "
        "embeddings N(0,1), linears N(0, 1/fan_in); f32 weights; legacy config keys (rope_theta, torch_dtype)",
        "seed": seed,
        "legacy_config": True,
    }
    write_fixture("untied-rmsnorm", model, torch.float32, meta, prompt, 32)


def trained_bytes() -> None:
    seed = 2
    cfg = qwen3_config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)  # transformers' own init (normal 0.02, norms 1), then training
    text, text_meta = training_text()
    training = train(model, text, seed, steps=int(ARGS.train_steps), batch=32, seq=128, lr=3e-3)
    prompt_text = "The for statement is used to iterate over the elements of"
    prompt = list(prompt_text.encode("utf-8"))
    meta = {
        "description": "tied, byte vocabulary, trained on Python's documentation topics; f16 weights, "
        "sharded checkpoint (model.safetensors.index.json)",
        "seed": seed,
        "text": {
            "encoding": "bytes: token id = byte value (0..=255), text = UTF-8 of the ids; no special tokens",
            "prompt": prompt_text,
        },
        "training_text": text_meta,
        "training": training,
    }
    write_fixture("trained-bytes", model, torch.float16, meta, prompt, 96, max_shard_size="300KB")
    g = json.loads((HERE / "trained-bytes" / "golden.json").read_text())
    g["text"]["generated"] = bytes(g["generated_ids"]).decode("utf-8", errors="replace")
    (HERE / "trained-bytes" / "golden.json").write_text(json.dumps(g, indent=1) + "\n")
    print("  " + repr(prompt_text + g["text"]["generated"]))


def gqa4_hd128_long() -> None:
    seed = 3
    cfg = qwen3_config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    randomize(model, seed)
    prompt = torch.randint(0, cfg.vocab_size, (320,), generator=torch.Generator().manual_seed(seed + 1000)).tolist()
    meta = {
        "description": "random, untied, 8 query / 2 kv heads (GQA 4), head_dim 128, hidden 64, 320-token prompt; "
        "RMSNorm weights 1 + 0.2 N(0,1); bf16 weights",
        "seed": seed,
    }
    write_fixture("gqa4-hd128-long", model, torch.bfloat16, meta, prompt, 16)


FIXTURES = {
    "untied-rmsnorm": untied_rmsnorm,
    "trained-bytes": trained_bytes,
    "gqa4-hd128-long": gqa4_hd128_long,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="fixtures to (re)write; default all")
    parser.add_argument("--train-steps", default=700, type=int, help="steps for trained-bytes")
    ARGS = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    for name in ARGS.only or FIXTURES:
        FIXTURES[name]()
