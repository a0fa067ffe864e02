"""MLX's fused attention, mx.fast.scaled_dot_product_attention, as a vkdecode runner.

Needs MLX (`pip install mlx`; Apple silicon, or a Linux build with a GPU backend). MLX is
imported only when a case runs, so this file imports anywhere, but CI (no MLX) cannot run it.
Capabilities and the reasons for them: mlx_sdpa.toml.

    python3 examples/external/mlx_sdpa.py cases/        # or --worker
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vkrun  # noqa: E402


def attention(meta, arrays):
    import mlx.core as mx

    q = mx.array(arrays["q"].transpose(0, 2, 1, 3))  # MLX wants [B, H, T, D]
    k, v = mx.array(arrays["k"]), mx.array(arrays["v"])  # [B, Hkv, C, D]; GQA is native
    mask = mx.array(arrays["mask_bool"])  # [B, 1, T, C], True where visible
    extra = {"sinks": mx.array(arrays["sinks"])} if meta["sinks"] else {}
    try:
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=float(meta["scale"]), mask=mask, **extra
        )
    except TypeError as e:
        if extra:
            raise vkrun.Skip(f"this MLX has no sinks argument (MLX >= 0.29): {e}")
        raise
    out = np.array(out).transpose(0, 2, 1, 3)
    # A row whose mask is all False comes back NaN (0/0); vkdecode's contract says 0.
    out[~arrays["mask_bool"][:, 0].any(axis=-1)] = 0
    return out


if __name__ == "__main__":
    vkrun.main(attention=attention)
