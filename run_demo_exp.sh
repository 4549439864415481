#!/usr/bin/env bash
# VQT on all 19 VTAB-1k tasks with ViT-B/16 (ImageNet-1k supervised), Adam; Q and the sparsity
# keep-fraction per task as in the paper's demo. Then: python collect_demo_exp_results.py
# Every task runs even if an earlier one fails (as the original); the failed ones are listed at the
# end with their last `error:` line (each step's stderr is kept in $EXP_ROOT/logs/) and the exit
# status is 1. Ctrl-C stops the whole sweep (exit status 130), listing the steps that finished;
# rerunning the same command resumes (finished runs are reused).
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
usage() {
    echo "usage: bash run_demo_exp.sh GPUIDX   # the 19 tasks of the paper on GPU GPUIDX"
    echo "       bash run_demo_exp.sh --demo   # the built-in default: synthetic data + real digits, tiny ViT, CPU, minutes"
}
if [ $# -ne 1 ]; then
    usage >&2
    exit 2
fi
case $1 in
    -h | --help) usage; exit 0 ;;
esac

FAILED=()
FINISHED=()
CURRENT=""
ARGS="$*"
# on_interrupt: one Ctrl-C (SIGINT to the foreground process group, or SIGTERM) ends the sweep here,
# after the running step has stopped, and says what finished and how to resume
on_interrupt() {
    trap - INT TERM
    local done=none
    [ ${#FINISHED[@]} -eq 0 ] || done=$(printf '%s, ' "${FINISHED[@]}")
    echo "interrupted${CURRENT:+ during $CURRENT}; steps finished: ${done%, }" >&2
    echo "rerun \`bash run_demo_exp.sh $ARGS\` to resume: finished runs are reused, unfinished ones redone" >&2
    exit 130
}
trap on_interrupt INT TERM
# step LABEL LAUNCHER ARGS...: run one launcher (stderr shown and kept in $EXP_ROOT/logs); a failure is
# recorded with the step's last `error:` line (else its last stderr line) and returns non-zero.
step() {
    local label=$1 log
    shift
    CURRENT=$label
    mkdir -p "$EXP_ROOT/logs"
    log=$EXP_ROOT/logs/${label//[^A-Za-z0-9_.=-]/_}.stderr
    { bash "$@" 2>&1 1>&3 | tee "$log" >&2; } 3>&1 && FINISHED+=("$label") && return 0
    local status=$? line
    line=$(grep '^error:' "$log" | tail -n 1)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    FAILED+=("$label (exit $status): ${line:-no stderr}")
    return 1
}
# run_tasks NAME...: each task's training step, then its sparsity step when it has a keep fraction; the
# rows (DATA.NAME, classes, Q, keep fraction or -) come from the task table, src/data/tasks.py (all 19
# without NAMEs). Uses GPUIDX, OPTIMIZER and FEATURE.
run_tasks() {
    local rows name classes q frac
    rows=$($PYTHON -m src.data.tasks --rows "$@") || exit 2
    while IFS=$'\t' read -r name classes q frac <&3; do
        step "$name" scripts/VQT/run_vqt_vtab.sh "$GPUIDX" "$name" "$classes" "$q" "$OPTIMIZER" "$FEATURE" &&
            [ "$frac" != - ] && step "$name.compression" scripts/VQT/run_vqt_vtab_sparsity.sh \
                "$GPUIDX" "$name" "$classes" "$q" "$OPTIMIZER" "$FEATURE" "$frac"
    done 3<<< "$rows"
}
# summary: list the failed steps; the script's exit status (1 if any failed)
summary() {
    if [ ${#FAILED[@]} -eq 0 ]; then
        echo "all tasks finished (stderr of every step: $EXP_ROOT/logs/)"
        return 0
    fi
    echo "${#FAILED[@]} step(s) failed (full stderr in $EXP_ROOT/logs/):" >&2
    printf '  %s\n' "${FAILED[@]}" >&2
    return 1
}

if [ "$1" = "--demo" ]; then
    export MODEL_ROOT=demo_assets/pre-trained_weights DATA_PATH=demo_assets/vtab_data
    export EXP_ROOT=${EXP_ROOT:-h2t_vit_experiments_demo}
    # the paper runs 100 epochs (10 warm-up); the CPU demo runs 20 (2) to finish in minutes
    export VQT_EXTRA_OPTS="DATA.CROPSIZE 64 SOLVER.TOTAL_EPOCH 20 SOLVER.WARMUP_EPOCH 2"
    DEMO_TASKS=(vtab-eurosat vtab-svhn)
    $PYTHON scripts/make_demo_assets.py --dest demo_assets --tasks "${DEMO_TASKS[@]}" || exit 1
    GPUIDX=0 OPTIMIZER=adam FEATURE=demo_vit_tiny
    run_tasks "${DEMO_TASKS[@]}"
    $PYTHON collect_demo_exp_results.py --root "$EXP_ROOT" --feature demo_vit_tiny --tasks "${DEMO_TASKS[@]}" ||
        FAILED+=("collect_demo_exp_results.py (exit $?)")
    # real images: scikit-learn's digits as an image folder (DATA.SOURCE folder), VQT next to a linear probe
    $PYTHON scripts/demo_digits.py --dest demo_assets --exp-root "$EXP_ROOT" 2>"$EXP_ROOT/logs/digits.stderr" ||
        FAILED+=("scripts/demo_digits.py (exit $?): $(grep '^error:' "$EXP_ROOT/logs/digits.stderr" | tail -n 1)")
    summary
    exit $?
fi

export EXP_ROOT=${EXP_ROOT:-h2t_vit_experiments}
GPUIDX=$1
OPTIMIZER=adam
FEATURE=sup_vitb16_imagenet1k

run_tasks
summary
