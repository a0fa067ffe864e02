#!/usr/bin/env bash
# The GPU-machine work of issues 21 (ggml's flash attention) and 22 (PyTorch's SDPA) in two calls
# of at most 600 s, from staged binaries (targets/ggml/gpu-run.sh says how to stage):
#   targets/gpu-session.sh 1   suites with validation, bench, the SDPA report, then the first
#                              half (shard 0/2) of both campaigns until 480 s have passed
#   targets/gpu-session.sh 2   the second half (shard 1/2) of both campaigns, 480 s
# Campaigns shrink their findings past --duration: the scripts cap it (--shrink-time 30s) and
# every step runs under `timeout`, so the logs are packed before the call's 600 s limit.
# Logs come back as $OUT/logs.tar.gz (only 8 files may come back), the summary as stdout.
set -u
start=$(date +%s)
export LOGS=/tmp/logs; mkdir -p "$LOGS"
for f in .gl/*.deb; do dpkg -x "$f" / >/dev/null; done; ldconfig
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case "${1:-}" in
1)
    bash targets/ggml/gpu-run.sh suites
    bash targets/torch/gpu-run.sh report
    tar czf "$OUT/logs-suites.tar.gz" -C /tmp logs
    left=$(( 480 - ($(date +%s) - start) ))
    ;;
2) left=480 ;;
*) echo "usage: $0 1 | 2" >&2; exit 2 ;;
esac
shard=$(( ${1} - 1 ))/2
echo "== campaigns, shard $shard, ${left} s"
if [ "$left" -gt 30 ]; then
    SHARD=$shard JOBS=${JOBS:-8} timeout $((left + 60)) bash targets/ggml/gpu-run.sh campaign "$left" > "$LOGS/ggml-campaign.txt" 2>&1 &
    SHARD=$shard timeout $((left + 60)) bash targets/torch/gpu-run.sh campaign "$left" > "$LOGS/torch-campaign.txt" 2>&1 &
    wait
    cat "$LOGS/ggml-campaign.txt" "$LOGS/torch-campaign.txt"
fi
tar czf "$OUT/logs.tar.gz" -C /tmp logs
echo "session part $1 done in $(( $(date +%s) - start )) s"
