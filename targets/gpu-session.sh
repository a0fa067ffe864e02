#!/usr/bin/env bash
# The GPU-machine work of issues 21 (ggml's flash attention) and 22 (PyTorch's SDPA), from staged
# binaries (targets/ggml/gpu-run.sh says how to stage). A call may last 600 s, so the campaigns run
# in a new process session (setsid), which outlives the call while the machine stays warm:
#   targets/gpu-session.sh start [S]   the campaigns (S seconds, default 660: ggml's with --jobs 16
#                                      and one per PyTorch backend) start in the background from a
#                                      copy of the tree; the suites (SUITES=1) and the SDPA report
#                                      run meanwhile; returns before the call's limit
#   targets/gpu-session.sh finish      waits for the campaigns, then packs every log
# Campaigns shrink their findings past --duration: --shrink-time 30s caps that, `timeout` the rest.
# Logs come back as $OUT/logs.tar.gz (only 8 files may come back), the summary as stdout.
set -u
start=$(date +%s)
W=/tmp/vkdecode-session
export LOGS=$W/logs
for f in .gl/*.deb; do dpkg -x "$f" / >/dev/null; done; ldconfig
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
pack() { tar czf "$OUT/logs.tar.gz" -C "$W" logs; }
case "${1:-}" in
start)
    secs=${2:-660}
    rm -rf "$W"; mkdir -p "$W/tree" "$LOGS"
    # the next call re-copies the tree; the background job must not see files being replaced
    tar cf - --exclude=./.gl --exclude=./target --exclude=./.git . | tar xf - -C "$W/tree"
    cd "$W/tree"
    setsid bash -c "
        SHARD=0/1 JOBS=16 LOGS=$LOGS/ggml timeout $((secs + 90)) bash targets/ggml/gpu-run.sh campaign $secs \
            > $LOGS/ggml-campaign.txt 2>&1 &
        LOGS=$LOGS/torch timeout $((secs + 90)) bash targets/torch/gpu-run.sh campaign $secs \
            > $LOGS/torch-campaign.txt 2>&1 &
        wait; touch $W/done" < /dev/null > /dev/null 2>&1 &
    echo "== campaigns of ${secs} s started (seed ${SEED:-2026})"
    if [ "${SUITES:-0}" = 1 ]; then LOGS=$LOGS/ggml bash targets/ggml/gpu-run.sh suites; fi
    LOGS=$LOGS/torch timeout $(( 540 - ($(date +%s) - start) )) bash targets/torch/gpu-run.sh report
    pack
    ;;
finish)
    while [ ! -e "$W/done" ] && [ $(( $(date +%s) - start )) -lt 540 ]; do sleep 5; done
    [ -e "$W/done" ] || echo "campaigns still running after $(( $(date +%s) - start )) s"
    cat "$LOGS/ggml-campaign.txt" "$LOGS/torch-campaign.txt"
    pack
    ;;
*) echo "usage: $0 start [SECONDS] | finish" >&2; exit 2 ;;
esac
echo "session step $1 done in $(( $(date +%s) - start )) s"
