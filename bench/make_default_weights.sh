#!/usr/bin/env bash
# Rebuilds pl3d_ros/weights/sim_source_cpu.safetensors, the bundled default model:
# the cpu-preset two-stream network trained on the simulator's 'source' preset only
# (4 drives x 20 frames, seeds 101-104; validation: a 5th drive, seed 105).
# Usage: bench/make_default_weights.sh [WORK_DIR] [EPOCHS]     (about 25 min on 2 CPU cores)
set -euo pipefail
WORK=${1:-/tmp/pl3d_default_weights}
EPOCHS=${2:-12}
PL3D=${PL3D:-pl3d}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"
for seed in 101 102 103 104 105; do
  [ -e "$WORK/source-$seed" ] || $PL3D sim --preset source --frames 20 --seed "$seed" -o "$WORK/source-$seed"
done
$PL3D train --data "$WORK"/source-10{1,2,3,4} --val "$WORK/source-105" \
  --out "$WORK/sim_source_cpu.safetensors" --epochs "$EPOCHS" --val-every 4 --seed 0 --threads "${THREADS:-0}" "${@:3}"
cp "$WORK/sim_source_cpu.safetensors" "$REPO/pl3d_ros/weights/sim_source_cpu.safetensors"
echo "installed $REPO/pl3d_ros/weights/sim_source_cpu.safetensors"
