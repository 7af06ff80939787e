#!/usr/bin/env bash
# The GPU kit's one command on the device machine (docs/gpu.md): unpack the packages prepare.sh carried in .kit/,
# then train and measure (scripts/device/kit.py) within 9 minutes, leaving at most 8 files in $OUT.
#
#   bash scripts/device/run.sh              on the device: python3 there, .kit/ carried, $OUT set by the tool
#   bash scripts/device/run.sh --dry-run    here, on the CPU with the project's venv: tiny batches, no unpacking
#
# Further arguments go to kit.py (e.g. --only denoise-gray-gpu, --total-s 300). It never stops early: whatever
# fails is recorded in $OUT/kit.json and the next stage runs.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${OUT:?set OUT to the folder that receives the results}"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--dry-run" ]; then
    shift
    exec "${PYTHON:-$REPO/.venv/bin/python}" "$REPO/scripts/device/kit.py" --out "$OUT" --dry-run "$@"
fi

START=$(date +%s)
SITE=/tmp/site
mkdir -p "$SITE"
if [ -f "$REPO/.kit/site.tar.xz" ]; then
    tar -xJf "$REPO/.kit/site.tar.xz" -C "$SITE" || echo "run.sh: unpacking .kit/site.tar.xz failed" >&2
else
    echo "run.sh: no .kit/site.tar.xz (run scripts/device/prepare.sh here and carry .kit): no Ray there" >&2
fi
echo "run.sh: unpacked in $(($(date +%s) - START)) s"
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
# 9 minutes in all, so that a second run fits in a lent machine's 15 minutes; what unpacking took comes off.
exec "${PYTHON:-python3}" "$REPO/scripts/device/kit.py" --out "$OUT" --datasets "$REPO/.kit/datasets" \
    --total-s $((530 - ($(date +%s) - START))) "$@"
