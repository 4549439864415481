#!/usr/bin/env bash
# VQT with a self-supervised ViT (FEATURE mae_vitb16 / mocov3_vitb) on one VTAB-1k task.
# usage: bash scripts/VQT/run_vqt_vtab_ssl.sh GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_args 6 $# "GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE"
OUTPUT_DIR=$EXP_ROOT/VQTSSL_$4_$5
common_opts "$2" "$3" "$4" "$6" h2t-ssl-vit "$OUTPUT_DIR" "$5"
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --optimizer "$5" \
    "${COMMON_OPTS[@]}" SOLVER.DBG_TRAINABLE True
