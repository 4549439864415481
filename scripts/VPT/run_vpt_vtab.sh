#!/usr/bin/env bash
# A baseline on one VTAB-1k task, with VQT's protocol (lr x wd search on val200 over the original's grid for
# the type, then 5 seeds on train800val200). TRAIN_TYPE: linear end2end partial-1 tinytl-bias prompt-shallow
# prompt-deep adapter adaptformer lora vqt+prompt vqt+adaptformer vqt+lora (README "Baselines").
# PROMPT_LEN (default 10): prompt tokens per layer of the prompt types; Q_LEN (default 1): query tokens of vqt+*.
# usage: bash scripts/VPT/run_vpt_vtab.sh GPUIDX DATA_NAME NUM_CLASSES TRAIN_TYPE OPTIMIZER FEATURE [PROMPT_LEN [Q_LEN]]
set -euo pipefail
source "$(dirname "$0")/../VQT/common.sh"
USAGE="GPUIDX DATA_NAME NUM_CLASSES TRAIN_TYPE OPTIMIZER FEATURE [PROMPT_LEN [Q_LEN]]"
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,6p' "$0" | cut -c3-
    exit 0
fi
[ $# -ge 6 ] && [ $# -le 8 ] || require_args 6 $# "$USAGE"
TYPE=$4
PROMPT_LEN=${7:-10}
Q=${8:-1}
case $TYPE in
    prompt-shallow) METHOD=(MODEL.TRANSFER_TYPE prompt MODEL.PROMPT.NUM_TOKENS "$PROMPT_LEN" MODEL.PROMPT.DEEP False
                            MODEL.PROMPT.DROPOUT 0.0); SETTING=${TYPE}${PROMPT_LEN} ;;
    prompt-deep) METHOD=(MODEL.TRANSFER_TYPE prompt MODEL.PROMPT.NUM_TOKENS "$PROMPT_LEN" MODEL.PROMPT.DEEP True
                         MODEL.PROMPT.DROPOUT 0.1); SETTING=${TYPE}${PROMPT_LEN} ;;
    vqt+prompt) METHOD=(MODEL.TRANSFER_TYPE vqt+prompt MODEL.PROMPT.NUM_TOKENS "$PROMPT_LEN" MODEL.PROMPT.DEEP True
                        MODEL.PROMPT.DROPOUT 0.1 MODEL.H2T.NUM_QUERY_TOKENS "$Q" MODEL.H2T.DROPOUT 0.1)
                SETTING=vqt${Q}+prompt-deep${PROMPT_LEN} ;;
    vqt+adaptformer|vqt+lora) METHOD=(MODEL.TRANSFER_TYPE "$TYPE" MODEL.H2T.NUM_QUERY_TOKENS "$Q" MODEL.H2T.DROPOUT 0.1)
                              SETTING=vqt${Q}+${TYPE#vqt+} ;;
    linear|end2end|partial-1|tinytl-bias|adapter|adaptformer|lora) METHOD=(MODEL.TRANSFER_TYPE "$TYPE"); SETTING=$TYPE ;;
    *) echo "error: TRAIN_TYPE '$TYPE' is not one of linear end2end partial-1 tinytl-bias prompt-shallow prompt-deep" \
            "adapter adaptformer lora vqt+prompt vqt+adaptformer vqt+lora" >&2; exit 2 ;;
esac
case $6 in mae_*|mocov3_*) MODEL_TYPE=h2t-ssl-vit ;; *) MODEL_TYPE=h2t-vit ;; esac
OPTS=(MODEL.TYPE "$MODEL_TYPE" "${METHOD[@]}" DATA.BATCH_SIZE 128 DATA.FEATURE "$6" DATA.NAME "$2"
      DATA.NUMBER_CLASSES "$3" DATA.DATAPATH "$DATA_PATH" MODEL.MODEL_ROOT "$MODEL_ROOT"
      OUTPUT_DIR "$EXP_ROOT/${SETTING}_$5" SOLVER.OPTIMIZER "$5")
if [ -n "${VQT_EXTRA_OPTS:-}" ]; then
    read -r -a extra <<< "$VQT_EXTRA_OPTS"
    OPTS+=("${extra[@]}")
fi
CUDA_VISIBLE_DEVICES=$1 $PYTHON tune_vtab.py --config-file configs/vpt/vtab.yaml --optimizer "$5" --arch_feats "$6" \
    "${OPTS[@]}"
