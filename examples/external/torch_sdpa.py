"""PyTorch's torch.nn.functional.scaled_dot_product_attention on CUDA, as a vkdecode runner.

Needs PyTorch with CUDA (a GPU machine); torch is imported only when a case runs, so this file
imports anywhere, but CI (no torch, no GPU) cannot run it. One SDPA backend and one compute
dtype per run:

    python3 examples/external/torch_sdpa.py --backend efficient --dtype float32 cases/
    vkdecode judge cases/                     # export with --caps torch_sdpa.toml

float16/bfloat16 runs round q, K/V and the weights to that type, so export them with
torch_sdpa_f16.toml or torch_sdpa_bf16.toml, whose precision profile says so. A backend that
rejects a case (flash takes no mask, for one) makes it a skip.
"""

import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vkrun  # noqa: E402

BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "cudnn": "CUDNN_ATTENTION"}


def attention(meta, arrays, backend, dtype):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Keep f32 matmuls in f32 (no TF32) and f16/bf16 ones accumulating in f32, as the caps
    # files declare.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False

    n_seqs, n_queries, n_q_heads, head_dim = arrays["q"].shape
    out = np.zeros((n_seqs, n_queries, n_q_heads, head_dim), dtype=np.float32)
    length = int(arrays["seq_lens"].max(initial=0))  # nothing visible lies past the longest
    seen = arrays["mask_bool"][:, :, :, :length]  # [B, 1, T, L]
    if length == 0:
        return out
    to_gpu = functools.partial(_to_gpu, dtype=getattr(torch, dtype))
    q = to_gpu(arrays["q"]).transpose(1, 2)  # SDPA wants [B, H, T, D]
    k, v = to_gpu(arrays["k"][:, :, :length]), to_gpu(arrays["v"][:, :, :length])
    # No mask when every row sees every position: the flash backend takes no mask at all.
    mask = None if seen.all() else torch.from_numpy(np.array(seen)).to("cuda")
    with sdpa_kernel(getattr(SDPBackend, BACKENDS[backend])):
        try:
            o = _sdpa(q, k, v, mask, float(meta["scale"]))
        except RuntimeError as e:
            if "No available kernel" in str(e):
                raise vkrun.Skip(f"{backend}: {e}")
            raise
    out[:] = o.transpose(1, 2).float().cpu().numpy()
    # A fully masked row is NaN or 0 depending on the backend; vkdecode's contract says 0.
    out[~seen[:, 0].any(axis=-1)] = 0
    return out


def _to_gpu(x, dtype):
    import torch

    return torch.from_numpy(np.array(x)).to("cuda", dtype)  # a copy: the inputs are read-only


def _sdpa(q, k, v, mask, scale):
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    if group > 1:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except (TypeError, RuntimeError):
            # torch < 2.5 has no enable_gqa, and not every backend takes it: repeat each kv head
            # for the consecutive query heads that share it instead.
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="math", help="the SDPA backend")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="the type q, K and V are converted to")
    opts, rest = parser.parse_known_args()
    kernel = functools.partial(attention, backend=opts.backend, dtype=opts.dtype)
    vkrun.main(attention=kernel, argv=rest, parents=[parser])  # parents: --help lists both
