"""Shared driver of vkdecode's external runners (docs/BYOK.md, "Kernels behind another
language").

A runner defines `attention(meta, arrays)` and/or `kv_append(meta, arrays)` and calls
`vkrun.main(attention=..., kv_append=...)`. This module does the rest: it finds the case
folders, loads `case.json` and the input arrays, calls the kernel function and writes
`result/` (each file atomically, `status.json` last), either over export folders given on the
command line or as a warm worker speaking the JSON-lines protocol of `vkdecode-fuzz --external`.

Only the standard library and NumPy, so every runner can import it.
"""

import argparse
import json
import os
import sys
import traceback

import numpy as np

__all__ = ["Skip", "main", "run_case", "visible", "kv_head", "cache_index", "encode", "decode"]

# Dtypes an attention output may be written in (the judge reads <f2, <f4 and <f8).
OUT_DTYPES = (np.float16, np.float32, np.float64)


class Skip(Exception):
    """Raised by a kernel function for a case it does not handle: status `skip` with the
    message as the reason (never counted as a failure)."""


# --- helpers shared by runners -----------------------------------------------------------


def visible(meta, arrays, b, t):
    """Positions [first, end) that query t of sequence b sees.

    The queries are the last T tokens of the sequence, so query t sits at len_b − T + t and
    sees everything up to it; a window w keeps the last w of those. end ≤ first: no position.
    """
    n_queries = meta["shape"]["n_queries"]
    end = max(0, int(arrays["seq_lens"][b]) - n_queries + t + 1)
    window = meta.get("window")
    first = max(0, end - window) if window is not None else 0
    return first, end


def kv_head(meta, h):
    """The kv head query head h reads: consecutive query heads share one (grouped GQA)."""
    shape = meta["shape"]
    return h // (shape["n_q_heads"] // shape["n_kv_heads"])


def cache_index(meta, b, h, pos):
    """Element offset of (b, h, pos, 0) in a raw cache; the dim stride is 1.

    Plain arithmetic, so NumPy integer arrays broadcast (pass int64 ones: offsets can exceed
    2^31)."""
    strides = meta["layout"]["strides"]
    return b * strides["seq"] + h * strides["head"] + pos * strides["pos"]


def encode(x, dtype):
    """f32 values → raw cache elements of `dtype` ("f32", "f16" or "bf16").

    Round to nearest even (subnormals included, overflow to ±Inf); a NaN becomes the type's
    canonical quiet NaN with the input's sign. f32 keeps every bit, NaN payloads included.
    Returns `<f4`, `<f2` or `<u2` (bf16 bits) with x's shape.
    """
    x = np.ascontiguousarray(x, dtype="<f4")
    if dtype == "f32":
        return x.copy()
    sign = (x.view("<u4") >> 16).astype("<u2") & 0x8000
    nan = np.isnan(x)
    if dtype == "f16":
        # NumPy's cast rounds to nearest even but keeps NaN payload bits: fix those up.
        with np.errstate(all="ignore"):
            raw = x.astype("<f2")
        bits = raw.view("<u2")
        bits[nan] = sign[nan] | 0x7E00
        return raw
    if dtype == "bf16":
        # Round to nearest even on the bits: add half an ulp minus one, plus the lowest kept
        # bit (ties go to even), then truncate. Overflow carries into the exponent: ±Inf.
        bits = x.view("<u4").astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        rounded[nan] = sign[nan] | 0x7FC0
        return rounded
    raise ValueError(f"unknown cache dtype {dtype!r}")


def decode(raw, dtype):
    """Raw cache elements of `dtype` → f32 values (exact)."""
    raw = np.asarray(raw)
    if dtype == "f32":
        return raw.astype("<f4")
    if dtype == "f16":
        return raw.view("<f2").astype("<f4")
    if dtype == "bf16":
        return (raw.view("<u2").astype("<u4") << 16).view("<f4")
    raise ValueError(f"unknown cache dtype {dtype!r}")


# --- one case -------------------------------------------------------------------------------


def load_case(case_dir):
    """case.json and its input arrays (read-only, so a runner that would change an input in
    place fails loudly instead of computing from altered data)."""
    with open(os.path.join(case_dir, "case.json")) as f:
        meta = json.load(f)
    arrays = {}
    for name, spec in meta["arrays"].items():
        a = np.load(os.path.join(case_dir, spec["file"]), allow_pickle=False)
        if a.dtype != np.dtype(spec["descr"]) or list(a.shape) != list(spec["shape"]):
            raise ValueError(
                f"{spec['file']}: {a.dtype.str} {list(a.shape)}, case.json says "
                f"{spec['descr']} {spec['shape']}"
            )
        a.flags.writeable = False
        arrays[name] = a
    return meta, arrays


def _as_cache(x, like, name):
    """A returned cache, checked against the raw input it replaces."""
    x = np.asarray(x)
    if x.dtype != like.dtype or x.shape != like.shape:
        raise ValueError(
            f"{name}: got {x.dtype.str} {list(x.shape)}, want {like.dtype.str} {list(like.shape)}"
        )
    return np.ascontiguousarray(x)


def _as_out(out, meta):
    """The attention output as written: float16/32/64 kept, anything else as float32."""
    out = np.asarray(out)
    dtype = out.dtype if out.dtype.type in OUT_DTYPES else np.dtype(np.float32)
    out = np.ascontiguousarray(out, dtype=dtype.newbyteorder("<"))
    s = meta["shape"]
    want = (s["n_seqs"], s["n_queries"], s["n_q_heads"], s["head_dim"])
    if out.shape != want:
        raise ValueError(f"out: got shape {list(out.shape)}, want {list(want)}")
    return out


def _caches(arrays, returned):
    """The k_cache.npy and v_cache.npy to write from a returned (k_cache, v_cache) pair."""
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise ValueError("caches are returned as a tuple (k_cache_after, v_cache_after)")
    names = ("k_cache", "v_cache")
    return [(f"{name}.npy", _as_cache(x, arrays[name], name)) for name, x in zip(names, returned)]


def _results(meta, arrays, returned):
    """The files to write, [(name, array)], from what the kernel function returned."""
    if meta["kernel"] == "kv_append":
        return _caches(arrays, returned)
    if meta.get("fused"):
        if not (isinstance(returned, tuple) and len(returned) == 3):
            raise ValueError("a fused case returns (out, k_cache_after, v_cache_after)")
        return [("out.npy", _as_out(returned[0], meta))] + _caches(arrays, returned[1:])
    if isinstance(returned, tuple):
        raise ValueError("a non-fused attention case returns the output only")
    return [("out.npy", _as_out(returned, meta))]


def _replace(path, write):
    """Write through a temporary name in the same folder, then rename: a reader never sees a
    half-written file, even if this process dies mid-write."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_npy(path, array):
    _replace(path, lambda f: np.save(f, array, allow_pickle=False))


def _save_status(result_dir, status):
    _replace(os.path.join(result_dir, "status.json"), lambda f: f.write(json.dumps(status).encode() + b"\n"))


def run_case(case_dir, kernels):
    """Runs one case folder and writes its result/; returns the status written."""
    if not os.path.isfile(os.path.join(case_dir, "case.json")):
        # No case here: nothing may be created in a folder that is not one.
        print(f"{case_dir}: no case.json", file=sys.stderr)
        return {"status": "error", "message": "no case.json"}
    result_dir = os.path.join(case_dir, "result")
    os.makedirs(result_dir, exist_ok=True)
    # A status left by an earlier run must not vouch for the files this run is replacing.
    if os.path.exists(os.path.join(result_dir, "status.json")):
        os.remove(os.path.join(result_dir, "status.json"))
    try:
        meta, arrays = load_case(case_dir)
        fn = kernels.get(meta["kernel"])
        if fn is None:
            raise Skip(f"no {meta['kernel']} kernel")
        for name, array in _results(meta, arrays, fn(meta, arrays)):
            _save_npy(os.path.join(result_dir, name), array)
        status = {"status": "ok"}
    except Skip as e:
        status = {"status": "skip", "reason": str(e)}
    except Exception as e:  # any runner failure is the case's result, not the driver's
        message = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"{case_dir}: error: {message}", file=sys.stderr)
        status = {"status": "error", "message": message}
    _save_status(result_dir, status)
    return status


# --- the two modes --------------------------------------------------------------------------


def _case_dirs(path):
    """The case folders under one command-line path, in export order."""
    index = os.path.join(path, "index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, name) for name in json.load(f)]
    if os.path.isfile(os.path.join(path, "case.json")):
        return [path]
    raise SystemExit(f"{path}: neither an export (index.json) nor a case folder (case.json)")


def _run_paths(paths, kernels, prog):
    dirs = [d for p in paths for d in _case_dirs(p)]  # all paths checked before any case runs
    counts = {"ok": 0, "skip": 0, "error": 0}
    for d in dirs:
        counts[run_case(d, kernels)["status"]] += 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    print(f"{prog}: {len(dirs)} cases: {summary}", file=sys.stderr)


def _worker(kernels):
    """`vkdecode-fuzz --external`: one JSON line in per batch, `{"done": batch}` out."""
    # stdout carries the protocol alone: anything else there is malformed. Keep a private
    # handle on it and point fd 1 (and sys.stdout) at stderr, so prints from a runner or from
    # native code in its libraries pass through to the fuzzer's stderr instead.
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)  # malformed input: crash, and the fuzzer restarts us
        for name in request["cases"]:
            run_case(os.path.join(request["batch"], name), kernels)
        protocol.write(json.dumps({"done": request["batch"]}) + "\n")
        protocol.flush()


def main(attention=None, kv_append=None, argv=None, parents=()):
    """Entry point of a runner. `argv` defaults to sys.argv[1:]. A runner with options of its
    own parses them first (argparse's parse_known_args on a parser made with add_help=False),
    then passes the rest as `argv` and its parser in `parents`, so that --help lists them."""
    prog = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(prog=prog, description="A vkdecode external runner.", parents=parents)
    parser.add_argument("--worker", action="store_true",
                        help="serve `vkdecode-fuzz --external` batches on stdin/stdout")
    parser.add_argument("paths", nargs="*", help="export folders (index.json) or case folders (case.json)")
    args = parser.parse_args(argv)
    if args.worker == bool(args.paths):
        parser.error("give either --worker or one or more paths")
    kernels = {"attention": attention, "kv_append": kv_append}
    if args.worker:
        _worker(kernels)
    else:
        _run_paths(args.paths, kernels, prog)
