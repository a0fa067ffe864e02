#!/usr/bin/env bash
# Compile ggml-vulkan's scalar flash-attention shaders into SPIR-V for the ggml target manifests.
#
#   targets/ggml/build-spirv.sh OUTDIR
#
# The GLSL sources are not vendored: they come from llama.cpp's tree as shipped in the
# llama-cpp-sys-2 crate (pinned to 0.1.161 in fetch/Cargo.toml and fetch/Cargo.lock), which
# `cargo fetch` downloads and unpacks into $CARGO_HOME/registry/src without building anything.
# Each output is compiled with the same glslc flags and preprocessor defines as ggml's own shader
# generator (ggml/src/ggml-vulkan/vulkan-shaders/vulkan-shaders-gen.cpp) uses for the variant of
# the same name. K/V element type, the "aligned" choice (the Clamp constant), tile sizes and
# feature flags are specialization constants set by the manifests, not separate modules.
#
# Environment: CARGO_HOME (honoured by cargo), GLSLC (default: glslc).
# Exit status: 0 ok, 1 usage, 2 missing tool, 3 fetch failed (offline?), 4 compile failed.
set -euo pipefail

die() {
    local code=$1
    shift
    printf 'build-spirv: %s\n' "$*" >&2
    exit "$code"
}

[[ $# -eq 1 ]] || die 1 "usage: $0 OUTDIR"
outdir=$1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
manifest="$here/fetch/Cargo.toml"
crate=llama-cpp-sys-2
version=0.1.161

glslc=${GLSLC:-glslc}
command -v "$glslc" >/dev/null 2>&1 ||
    die 2 "glslc not found (install Debian's 'glslc' package or set GLSLC=/path/to/glslc)"
command -v cargo >/dev/null 2>&1 || die 2 "cargo not found"
command -v python3 >/dev/null 2>&1 || die 2 "python3 not found"

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Limit the download to the host's platform-specific dependencies when the host triple is known.
target_args=()
host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
if [[ -n $host ]]; then
    target_args=(--target "$host")
fi

# Fetch with the pinned lockfile; fall back to what CARGO_HOME already holds when offline.
if ! cargo fetch --manifest-path "$manifest" --locked "${target_args[@]}" >"$log" 2>&1; then
    if ! cargo fetch --manifest-path "$manifest" --locked --offline "${target_args[@]}" >>"$log" 2>&1; then
        tail -n 5 "$log" >&2
        die 3 "cannot fetch $crate $version with cargo (offline, and not already in ${CARGO_HOME:-$HOME/.cargo}/registry?)"
    fi
fi

# --filter-platform matches the fetch: without it cargo wants every platform's crates present.
platform_args=()
if [[ -n $host ]]; then
    platform_args=(--filter-platform "$host")
fi
metadata=$(cargo metadata --format-version 1 --manifest-path "$manifest" --locked --offline \
    "${platform_args[@]}" 2>>"$log") || {
    tail -n 5 "$log" >&2
    die 3 "cargo metadata failed for $manifest"
}
crate_toml=$(python3 -c '
import json, sys
meta = json.loads(sys.stdin.read())
hits = [p["manifest_path"] for p in meta["packages"]
        if p["name"] == sys.argv[1] and p["version"] == sys.argv[2]]
if len(hits) != 1:
    sys.exit("build-spirv: %s %s not found in cargo metadata" % (sys.argv[1], sys.argv[2]))
print(hits[0])
' "$crate" "$version" <<<"$metadata") || exit 3
src="$(dirname "$crate_toml")/llama.cpp/ggml/src/ggml-vulkan/vulkan-shaders"
[[ -f $src/flash_attn.comp ]] || die 3 "no flash_attn.comp under $src"

mkdir -p "$outdir"

# name | source | defines (space-separated NAME=VALUE, exactly as vulkan-shaders-gen passes them)
fp16_base="FLOAT_TYPE=float16_t FLOAT_TYPEV2=f16vec2 FLOAT_TYPEV4=f16vec4 FLOAT16=1 FLOAT_TYPE_MAX=float16_t(65504.0)"
fp32_base="FLOAT_TYPE=float FLOAT_TYPEV2=vec2 FLOAT_TYPEV4=vec4"
acc_f32="ACC_TYPE=float ACC_TYPEV2=vec2 ACC_TYPEV4=vec4"
acc_f16="ACC_TYPE=float16_t ACC_TYPEV2=f16vec2 ACC_TYPEV4=f16vec4 ACC_TYPE_MAX=float16_t(65504.0)"
fa_tail="DATA_A_IQ4_NL=1 Q_TYPE=float D_TYPE=float D_TYPEV4=vec4"
variants=(
    # fp16 device, GGML_PREC_F32 (what llama.cpp requests): f16 storage/math, f32 accumulators
    "flash_attn_f32_f16|flash_attn.comp|$fp16_base $acc_f32 $fa_tail"
    # fp16 device, default precision: f16 accumulators as well
    "flash_attn_f32_f16_f16acc|flash_attn.comp|$fp16_base $acc_f16 $fa_tail"
    # device without fp16 arithmetic, or bf16 K/V on any device: everything f32
    "flash_attn_f32_f16_fp32|flash_attn.comp|$fp32_base $acc_f32 $fa_tail"
    # split-K combine pass
    "fa_split_k_reduce|flash_attn_split_k_reduce.comp|"
)

for v in "${variants[@]}"; do
    IFS='|' read -r name source defines <<<"$v"
    args=(-fshader-stage=compute --target-env=vulkan1.2 "$src/$source" -o "$outdir/$name.spv" -O)
    for d in $defines; do
        args+=("-D$d")
    done
    if ! "$glslc" "${args[@]}" 2>"$log"; then
        cat "$log" >&2
        die 4 "glslc failed on $source for $name"
    fi
    printf '%s\n' "$outdir/$name.spv"
done
