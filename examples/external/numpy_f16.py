"""Attention in float16 arithmetic, the way ggml-vulkan's default (fp16) flash attention rounds.

Judged with `profile = "f16_softmax"` (numpy_f16.toml): the scaled query and K/V as f16, q·k
in f32, the softmax weights and the output sums in f16; the row sums in f32, as ggml keeps
them (f16 row sums stagnate past 2048: over 33k positions their NMSE nears 5e-4). The visible positions are
walked in tiles of 32 with an online softmax, as the shader does, so the f16 rescaling and
accumulation errors are the shader's kind; it shows what that profile admits and costs
against numpy_f64.py. Only the visible positions are read (poison slot contract).

    python3 examples/external/numpy_f16.py cases/        # or --worker
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vkrun  # noqa: E402

F16, F32 = np.float16, np.float32
TILE = 32  # positions per step of the online softmax (ggml's Bc for decode)


def attention(meta, arrays):
    """Output [B, T, H, D] in float16."""
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    n_seqs, n_queries, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    scale = F32(meta["scale"])
    sinks = arrays["sinks"].reshape(n_kv_heads, -1, 1) if meta["sinks"] else None
    out = np.zeros((n_seqs, n_queries, n_q_heads, head_dim), dtype=F16)
    for b in range(n_seqs):
        for t in range(n_queries):
            first, end = vkrun.visible(meta, arrays, b, t)
            if end <= first:  # a row that sees nothing stays exactly 0
                continue
            # ggml scales q in f32 and keeps it as f16; consecutive query heads share a kv
            # head, so [H, D] → [Hkv, group, D] lines them up with K/V.
            with np.errstate(over="ignore"):
                qs = (q[b, t] * scale).astype(F16).reshape(n_kv_heads, -1, head_dim)
            out[b, t] = _row(qs, k[b, :, first:end], v[b, :, first:end], meta["softcap"], sinks)
    return out


def _row(qs, k, v, softcap, sinks):
    """All heads of one query: qs [Hkv, group, D] f16, k and v [Hkv, n, D] f32 values."""
    with np.errstate(over="ignore"):  # an f32 (or bf16) cache value past 65504 is ±Inf in f16
        k16, v16 = k.astype(F16), v.astype(F16)
    q32 = qs.astype(F32)
    m = np.full(qs.shape[:2] + (1,), -np.inf, dtype=F32)  # running max (f32, as the scores)
    l = np.zeros(qs.shape[:2] + (1,), dtype=F32)  # running Σ p (f32, as ggml's row sums)
    # The running output Σ p·v / l, kept normalised so that it stays within max |v|: an f16
    # Σ p·v over hundreds of positions of |v| ~ 1000 would overflow 65504.
    o = np.zeros(qs.shape, dtype=F16)
    for j in range(0, k.shape[1], TILE):
        s = q32 @ k16[:, j:j + TILE].astype(F32).transpose(0, 2, 1)  # f32 dot products
        if softcap is not None:
            c = F32(softcap)
            s = c * np.tanh(s / c)
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        alpha = np.exp(m - m_new).astype(F16)  # rescales what earlier tiles summed
        p = np.exp(s - m_new).astype(F16)  # the weights as P·V reads them
        # f16 × f16 products are exact in f32: the tile's P·V is summed there and rounded
        # once, after the division by l; NumPy's f16 arithmetic rounds the rest to f16.
        pv = p.astype(F32) @ v16[:, j:j + TILE].astype(F32)
        kept = l * alpha.astype(F32)
        l = kept + p.sum(axis=-1, keepdims=True, dtype=F32)
        # The tile's share is divided by l before it is rounded: Σ p·v of one tile alone can pass
        # 65504 (corpus/attention/f16-accumulator-overflow).
        o = o * (kept / l).astype(F16) + (pv / l).astype(F16)
        m = m_new
    if sinks is not None:
        # The sink is one more tile with a single logit and no value.
        m_new = np.maximum(m, sinks)
        kept = l * np.exp(m - m_new)
        l = kept + np.exp(sinks - m_new)
        o = o * (kept / l).astype(F16)
    return o.reshape(-1, qs.shape[-1])


if __name__ == "__main__":
    vkrun.main(attention=attention)
