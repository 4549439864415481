#!/usr/bin/env bash
# Classifier compression after run_vqt_vtab.sh finished for the same task/Q/optimizer/feature:
# group-lasso head (compress), then keep FRACTION of the features and retrain the head (featselect).
# usage: bash scripts/VQT/run_vqt_vtab_sparsity.sh GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE FRACTION
set -euo pipefail
source "$(dirname "$0")/common.sh"
require_args 7 $# "GPUIDX DATA_NAME NUM_CLASSES Q_LEN OPTIMIZER FEATURE FRACTION"
# FRACTION (MODEL.H2T.KEEP_FRAC) must be a number in (0, 1]; checked before the compress stage starts
if ! awk -v f="$7" 'BEGIN { exit !(f ~ /^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$/ && f > 0 && f <= 1) }'; then
    echo "error: FRACTION '$7' must be a number in (0, 1], e.g. 0.7 (the fraction of features kept)" >&2
    exit 2
fi
FRACTION=$7
[[ $FRACTION == *[.eE]* ]] || FRACTION=$FRACTION.0  # yacs needs a float for MODEL.H2T.KEEP_FRAC
OUTPUT_DIR=$EXP_ROOT/VQTSup_$4_$5
LRP_COEF=0.0001
common_opts "$2" "$3" "$4" "$6" h2t-vit "$OUTPUT_DIR" "$5"
echo "Compressing the model ..."
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --sparse-mode compress \
    "${COMMON_OPTS[@]}" MODEL.H2T.LRP_COEF $LRP_COEF MODEL.H2T.KEEP_FRAC 1.0
echo "Feature selection and training with $FRACTION ..."
CUDA_VISIBLE_DEVICES=$1 $PYTHON train.py --train-type h2t-prompt \
    --config-file configs/h2t-prompt/vtab.yaml --sparse-mode featselect \
    "${COMMON_OPTS[@]}" MODEL.H2T.LRP_COEF 0.0 MODEL.H2T.KEEP_FRAC "$FRACTION"
