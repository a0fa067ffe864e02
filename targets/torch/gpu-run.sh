#!/usr/bin/env bash
# PyTorch's scaled_dot_product_attention on CUDA through examples/external/torch_sdpa.py, on a
# GPU machine whose python has PyTorch (the lent H100/H200), from staged binaries (see
# targets/ggml/gpu-run.sh for staging). Logs go to $LOGS (default /tmp/torch-logs).
#   targets/torch/gpu-run.sh report       corpus + grid through every backend: judge --json each,
#                                         and a table of NMSE and worst error/bound per backend
#   targets/torch/gpu-run.sh campaign S   one campaign per backend for S seconds (SHARD=K/N)
set -u
B=${B:-.dev/bin}
LOGS=${LOGS:-/tmp/torch-logs}; mkdir -p "$LOGS"
PY=${PY:-python3}
R=examples/external
# backend dtype caps: flash and cuDNN take only 16-bit types; math and efficient take f32 too.
RUNS="math float32 torch_sdpa.toml
efficient float32 torch_sdpa.toml
math float16 torch_sdpa_f16.toml
flash float16 torch_sdpa_f16.toml
efficient float16 torch_sdpa_f16.toml
cudnn float16 torch_sdpa_f16.toml
flash bfloat16 torch_sdpa_bf16.toml
cudnn bfloat16 torch_sdpa_bf16.toml"
if ! $PY -c "import torch, numpy; assert torch.cuda.is_available()" 2>"$LOGS/torch-import.txt"; then
    echo "no PyTorch with CUDA here: $(tail -1 "$LOGS/torch-import.txt")"; exit 3
fi
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
case "${1:-}" in
report)
    echo "$RUNS" | while read -r backend dtype caps; do
        dir=/tmp/torch-export/$backend-$dtype; rm -rf "$dir"
        $B/vkdecode export "$dir" --caps "$R/$caps" > /dev/null || continue
        $PY $R/torch_sdpa.py --backend "$backend" --dtype "$dtype" "$dir" 2> "$LOGS/runner-$backend-$dtype.txt"
        $B/vkdecode judge "$dir" --json --save-failures "$LOGS/failures/$backend-$dtype" \
            > "$LOGS/judge-$backend-$dtype.json" 2> "$LOGS/judge-$backend-$dtype.err"
    done
    $PY - "$LOGS" <<'PY'
import glob, json, os, sys
print(f"{'backend':<10} {'dtype':<9} {'ok':>4} {'FAIL':>4} {'ERR':>4} {'skip':>4} {'max NMSE':>10} {'worst err/bound':>16}")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "judge-*.json"))):
    backend, dtype = os.path.basename(f)[6:-5].split("-")
    try:
        r = json.load(open(f))["results"]
    except Exception as e:
        print(f"{backend:<10} {dtype:<9} unreadable: {e}"); continue
    count = lambda v: sum(x["verdict"] == v for x in r)
    ran = [x["outcome"] for x in r if x["outcome"]]
    num = lambda v: float("inf") if v is None else v  # JSON writes NaN and Inf as null
    nmse = max((num(o["nmse"]) for o in ran), default=float("nan"))
    ratio = max((num(o["worst_ratio"]) for o in ran), default=float("nan"))
    print(f"{backend:<10} {dtype:<9} {count('ok'):>4} {count('FAIL'):>4} {count('ERROR'):>4} {count('unsupported'):>4} {nmse:>10.2e} {ratio:>16.3e}")
    for x in r:
        if x["verdict"] in ("FAIL", "ERROR"):
            print("    ", x["verdict"], x["name"], ((x["outcome"] or {}).get("detail") or x["error"] or "")[:160])
PY
    ;;
campaign)
    while read -r backend dtype caps; do
        $B/vkdecode-fuzz --external "$PY $R/torch_sdpa.py --backend $backend --dtype $dtype --worker" \
            --caps "$R/$caps" --batch 16 --jobs 3 --duration "${2:-300}s" --seed "${SEED:-2026}" --shrink-time 30s --shard "${SHARD:-0/1}" \
            --corpus "$LOGS/corpus-$backend-$dtype" --json "$LOGS/fuzz-$backend-$dtype.json" \
            > "$LOGS/fuzz-$backend-$dtype.log" 2>&1 &
    done < <(echo "$RUNS" | grep -E '^(math float32|flash float16|efficient float16|cudnn bfloat16) ')
    wait
    for f in "$LOGS"/fuzz-*.log; do echo "== $f"; grep -E "cases in|passed, |^- |reproduce" "$f"; done
    ;;
*) echo "usage: $0 report | campaign SECONDS" >&2; exit 2 ;;
esac
