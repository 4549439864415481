# Shared by the VQT launchers: paths (overridable from the environment) and the common overrides.
# -h / --help: the launcher's header comment (what it does, its usage) on stdout, exit status 0
case "${1:-}" in
    -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
esac
MODEL_ROOT=${MODEL_ROOT:-pre-trained_weights}
DATA_PATH=${DATA_PATH:-vtab_data}
EXP_ROOT=${EXP_ROOT:-h2t_vit_experiments}
PYTHON=${PYTHON:-python}
# require_args EXPECTED GIVEN "ARG NAMES": print the usage and exit 2 on a wrong argument count
require_args() {
    if [ "$2" -ne "$1" ]; then
        echo "usage: bash $0 $3" >&2
        exit 2
    fi
}
# common_opts DATA_NAME NUM_CLASSES Q FEATURE MODEL_TYPE OUTPUT_DIR OPTIMIZER
common_opts() {
    COMMON_OPTS=(
        MODEL.TYPE "$5" MODEL.TRANSFER_TYPE h2t-prompt DATA.BATCH_SIZE 128
        MODEL.H2T.NUM_QUERY_TOKENS "$3" MODEL.H2T.DROPOUT 0.1
        DATA.FEATURE "$4" DATA.NAME "$1" DATA.NUMBER_CLASSES "$2"
        DATA.DATAPATH "$DATA_PATH" MODEL.MODEL_ROOT "$MODEL_ROOT"
        OUTPUT_DIR "$6" SOLVER.OPTIMIZER "$7"
    )
    # extra KEY VALUE overrides, e.g. VQT_EXTRA_OPTS="DATA.SOURCE imagefolder"
    if [ -n "${VQT_EXTRA_OPTS:-}" ]; then
        read -r -a extra <<< "$VQT_EXTRA_OPTS"
        COMMON_OPTS+=("${extra[@]}")
    fi
}
