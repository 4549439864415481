#!/usr/bin/env bash
# VQT with a supervised ViT on one VTAB-1k task: lr x wd search on val200, then 5 seeds.
# usage: bash scripts/VQT/run_vqt_vtab.sh GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_args 6 $# "GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE"
OUTPUT_DIR=$EXP_ROOT/VQTSup_$4_$5
common_opts "$2" "$3" "$4" "$6" h2t-vit "$OUTPUT_DIR" "$5"
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --optimizer "$5" \
    "${COMMON_OPTS[@]}" SOLVER.DBG_TRAINABLE True
