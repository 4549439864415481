#!/usr/bin/env bash
# Classifier compression after run_vqt_vtab.sh finished for the same task/Q/optimizer/feature:
# group-lasso head (compress), then keep FRACTION of the features and retrain the head (featselect).
# usage: bash scripts/VQT/run_vqt_vtab_sparsity.sh GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE FRACTION
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_args 7 $# "GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE FRACTION"
OUTPUT_DIR=$EXP_ROOT/VQTSup_$4_$5
LRP_COEF=0.0001
common_opts "$2" "$3" "$4" "$6" h2t-vit "$OUTPUT_DIR" "$5"
echo "Compressing the model ..."
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --sparse-mode compress \
    "${COMMON_OPTS[@]}" MODEL.H2T.LRP_COEF $LRP_COEF MODEL.H2T.KEEP_FRAC 1.0
echo "Feature selection and training with $7 ..."
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --sparse-mode featselect \
    "${COMMON_OPTS[@]}" MODEL.H2T.LRP_COEF 0.0 MODEL.H2T.KEEP_FRAC "$7"
