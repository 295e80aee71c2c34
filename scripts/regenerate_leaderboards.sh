#!/usr/bin/env bash
# Regenerate everything under leaderboards/ from a fresh store (README.md and submissions/
# there are kept): for each embedded suite (digits8, text8), the grid of every registered
# method and refiner variant, 3 seeds, plus the accepted submissions in leaderboards/submissions/, rendered as Markdown with PNG
# charts, CSV, JSON and LaTeX, and the papers' reported figures in their own cited
# "reported, not measured" tables.
#
#   scripts/regenerate_leaderboards.sh                      # the published grid
#   METHODS=ta,ties SEEDS=0 OUT=/tmp/lb scripts/regenerate_leaderboards.sh   # a quick look
#   SUITES=text8 SEEDS=0 OUT=/tmp/lb scripts/regenerate_leaderboards.sh      # one suite
#   tox -e leaderboards                                     # the same, in a clean env
#
# Variables (all optional):
#   SUITES    space-separated suites, each run as its own `atmbench run` (default: "digits8 text8")
#   METHODS   comma-separated method specs; default: every method `atmbench list` shows,
#             every refiner that can start from the base alone (atm) and each refiner
#             after each of REFINED
#   REFINED   methods also run with each refiner appended (default: "ta ties tsv")
#   SEEDS     default 0,1,2
#   MODEL     default: the suite's first model (with several SUITES, it must fit them all)
#   RUN_ARGS  extra `atmbench run` arguments, e.g. "--device cuda" or "--executor multi-gpu"
#   SKIP_<suite>  space-separated method names left out of that suite's grid (default: none;
#             every method runs on text8, see tests/test_text8_methods.py)
#   OUT       default leaderboards
#   ATMBENCH_HOME  default: a fresh temporary directory, so no stale expert or cell leaks in
set -euo pipefail
cd "$(dirname "$0")/.."

SUITES=${SUITES:-"digits8 text8"}
SEEDS=${SEEDS:-0,1,2}
OUT=${OUT:-leaderboards}
REFINED=${REFINED:-"ta ties tsv"}
export ATMBENCH_HOME=${ATMBENCH_HOME:-$(mktemp -d -t atmbench-leaderboards.XXXXXX)}

# Every method, every refiner that can start from the base alone (atm; lines only refines
# a merge), and each refiner after each of REFINED: read from the registry that runs them.
default_specs() {
    python - "$REFINED" <<'PY'
import sys
from atmbench import registry
specs = sorted(registry.methods())
for name, refiner in sorted(registry.refiners().items()):
    specs += [name] if refiner.data_from_base is not None else []
    specs += [f"{method}+{name}" for method in sys.argv[1].split()]
print(",".join(specs))
PY
}
METHODS=${METHODS:-$(default_specs)}

echo "ATMBENCH_HOME=$ATMBENCH_HOME" >&2
echo "methods: $METHODS" >&2
status=0
# --trace test: ATM's per-iteration test curve, drawn as <suite>-<model>-atm.png
for suite in $SUITES; do
    skip_var="SKIP_$suite"
    kept=()
    for spec in ${METHODS//,/ }; do   # drop a spec whose method (before ':' or '+') is skipped
        name=${spec%%[:+]*}
        [[ " ${!skip_var:-} " == *" $name "* ]] || kept+=("$spec")
    done
    suite_methods=$(IFS=,; echo "${kept[*]}")
    echo "$suite: $suite_methods" >&2
    # shellcheck disable=SC2086  # RUN_ARGS is a list of words on purpose
    atmbench run --suite "$suite" ${MODEL:+--model "$MODEL"} --methods "$suite_methods" --seeds "$SEEDS" \
        --trace test --quiet ${RUN_ARGS:-} >/dev/null || status=$?   # failed cells: render the rest, then fail
done

# Accepted submissions for other suites (store files or `atmbench export` JSON).
shopt -s nullglob
merges=()
for file in "$OUT"/submissions/*.json "$OUT"/submissions/*.sqlite; do
    merges+=(--merge "$file")
done

# One call writes the whole set (every format, the charts); --overwrite because replacing
# the published files is the point here (without it the command refuses to).
atmbench leaderboard --reported --overwrite --out "$OUT" ${merges[@]+"${merges[@]}"}
exit "$status"
