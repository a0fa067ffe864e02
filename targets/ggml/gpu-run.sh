#!/usr/bin/env bash
# ggml's flash attention on a GPU machine with no cargo or glslc (the lent H100/H200): run from a
# copy of the tree after staging here, with
#   ../shared/device/stage.sh -p vkdecode -p vkdecode-fuzz
#   mkdir -p .dev/ggml-spirv && cp target/tmp/ggml-spirv/*.spv .dev/ggml-spirv/   # from `cargo test --test ggml`
# and carrying .gl and .dev. Writes logs under $LOGS (default $OUT) and prints a short summary.
#   targets/ggml/gpu-run.sh suites      every suite with validation, ggml's kernel on all cases, and
#                                       bench attention with the manifest beside vkdecode's kernels
#   targets/ggml/gpu-run.sh campaign S  a campaign of S seconds against the f32_f16 build (--jobs 16;
#                                       SHARD=K/N splits one campaign over several calls)
set -u
for f in .gl/*.deb; do dpkg -x "$f" / >/dev/null; done; ldconfig
B=.dev/bin
LOGS=${LOGS:-${OUT:-/tmp/out}}; mkdir -p "$LOGS"
export VKDECODE_GGML_SPIRV=$PWD/.dev/ggml-spirv GGML_SPIRV=$PWD/.dev/ggml-spirv
$B/vkdecode devices > "$LOGS/devices.txt" 2>&1 ||
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
$B/vkdecode devices 2>&1 | head -3; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "${1:-}" in
suites)
    for t in conformance mutants manifest qwen3_reference qwen3_tokens vkdecode-lib-unit properties ggml; do
        s=$(date +%s)
        args=(--test-threads=${THREADS:-8})
        [ "$t" = ggml ] && args+=(--include-ignored)
        VKDECODE_VALIDATION=1 timeout "${SUITE_TIMEOUT:-300}" $B/$t "${args[@]}" > "$LOGS/$t.log" 2>&1
        echo "$t rc=$? $(( $(date +%s) - s ))s $(grep -E '^test result' "$LOGS/$t.log" | tail -1)"
    done
    $B/vkdecode bench attention --manifest targets/ggml/fa-f32-f16.toml > "$LOGS/bench.txt" 2>&1
    echo "bench rc=$?"; tail -28 "$LOGS/bench.txt"
    ;;
campaign)
    mkdir -p "$LOGS/corpus"
    $B/vkdecode-fuzz --manifest targets/ggml/fa-f32-f16.toml --duration "${2:-570}s" --jobs "${JOBS:-16}" --seed "${SEED:-2026}" --shrink-time 30s \
        --shard "${SHARD:-0/1}" --corpus "$LOGS/corpus" --json "$LOGS/fuzz.json" > "$LOGS/fuzz.log" 2>&1
    echo "fuzz rc=$?"; grep -E "cases in|passed, |^- |reproduce" "$LOGS/fuzz.log"
    ;;
*) echo "usage: $0 suites | campaign SECONDS" >&2; exit 2 ;;
esac
