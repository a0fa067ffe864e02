"""The exact runner: vkdecode's semantics in NumPy float64 (attention and kv_append).

It computes what the judge's f64 reference computes, so every case should pass with the
strict f32 profile (numpy_f64.toml); a failure here points at the export or the judge, not at
a kernel. It reads only the positions a query sees, so it runs under the poison slot contract.

    python3 examples/external/numpy_f64.py cases/        # or --worker
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vkrun  # noqa: E402


def attention(meta, arrays, see_past=0):
    """Output [B, T, H, D] in float64, plus the caches after the append for fused cases.

    `see_past` widens every row by that many positions past its last visible one (within the
    capacity): 0 here; planted_bug.py sets 1.
    """
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    n_seqs, n_queries, n_q_heads, head_dim = q.shape
    capacity = k.shape[2]
    sinks = arrays["sinks"] if meta["sinks"] else None
    out = np.zeros((n_seqs, n_queries, n_q_heads, head_dim))
    for b in range(n_seqs):
        for t in range(n_queries):
            first, end = vkrun.visible(meta, arrays, b, t)
            end = min(end + see_past, capacity)
            if end > first:  # a row that sees nothing stays exactly 0
                out[b, t] = _row(q[b, t], k[b, :, first:end], v[b, :, first:end], meta, sinks)
    if meta["fused"]:
        return (out,) + _fused_caches(meta, arrays)
    return out


def _row(q, k, v, meta, sinks):
    """All heads of one query: q [H, D], k and v [Hkv, n, D] (the visible positions)."""
    n_kv_heads, _, head_dim = k.shape
    # Consecutive query heads share a kv head, so [H, D] → [Hkv, group, D] lines them up.
    q = q.astype(np.float64).reshape(n_kv_heads, -1, head_dim)
    s = float(meta["scale"]) * (q @ k.astype(np.float64).transpose(0, 2, 1))  # [Hkv, group, n]
    if meta["softcap"] is not None:
        c = float(meta["softcap"])
        s = c * np.tanh(s / c)
    m = s.max(axis=-1, keepdims=True)
    if sinks is not None:
        # The sink logit joins the max and the denominator, and has no value.
        sink = sinks.astype(np.float64).reshape(n_kv_heads, -1, 1)
        m = np.maximum(m, sink)
    w = np.exp(s - m)
    l = w.sum(axis=-1, keepdims=True)
    if sinks is not None:
        l += np.exp(sink - m)
    return ((w @ v.astype(np.float64)) / l).reshape(-1, head_dim)


def _fused_caches(meta, arrays):
    """The raw caches after a fused step: token t of sequence b lands at len_b − T + t."""
    n_queries = meta["shape"]["n_queries"]
    pos = arrays["seq_lens"].astype(np.int64)[:, None] - n_queries + np.arange(n_queries)
    return _write_tokens(meta, arrays, pos)


def kv_append(meta, arrays):
    """The raw caches after appending: token t of sequence b lands at starts_b + t."""
    n_new = meta["shape"]["n_new"]
    pos = arrays["starts"].astype(np.int64)[:, None] + np.arange(n_new)
    return _write_tokens(meta, arrays, pos)


def _write_tokens(meta, arrays, pos):
    """Copies of k_cache and v_cache with encode(new_k/new_v[b, t, h, :]) at pos[b, t]."""
    if pos.size and (pos.min() < 0 or pos.max() >= meta["shape"]["capacity"]):
        raise ValueError(f"a new token's position is outside 0..{meta['shape']['capacity']}")
    n_seqs, n_tokens, n_kv_heads, head_dim = arrays["new_k"].shape
    b = np.arange(n_seqs, dtype=np.int64)[:, None, None, None]
    h = np.arange(n_kv_heads, dtype=np.int64)[None, None, :, None]
    index = vkrun.cache_index(meta, b, h, pos[:, :, None, None]) + np.arange(head_dim)
    caches = []
    for name in ("k", "v"):
        raw = arrays[f"{name}_cache"].copy()
        new = vkrun.encode(arrays[f"new_{name}"], meta["dtype"])
        # Scatter through an unsigned view: a plain float copy could quiet a NaN payload.
        bits = f"<u{raw.dtype.itemsize}"
        raw.view(bits)[index] = new.view(bits)
        caches.append(raw)
    return tuple(caches)


if __name__ == "__main__":
    vkrun.main(attention=attention, kv_append=kv_append)
