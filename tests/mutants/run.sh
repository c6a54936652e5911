#!/usr/bin/env bash
# Mutant check: every patch in tests/mutants/ plants one bug in src/. For
# each, apply it to a scratch copy of the repository, build the tests its
# header names (`# kill: COMMAND`), run them, and count the mutant killed
# when the command fails (a test or loom model caught the bug; a hang is
# caught by the test's watchdog, or by the timeout here). A patch that does
# not apply or does not build fails the check: it would prove nothing.
#
# Prints `mutants: N/N killed`; exits non-zero unless every mutant dies.
# Usage: tests/mutants/run.sh [PATCH...]   (default: all)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${MUTANT_WORK:-$ROOT/target/mutants/work}
export MUTANT_TARGET=${MUTANT_TARGET:-$ROOT/target/mutants}
TIMEOUT=${MUTANT_TIMEOUT:-600}

patches=("$@")
if [ ${#patches[@]} -eq 0 ]; then
    patches=("$ROOT"/tests/mutants/*.patch)
fi

rm -rf "$WORK"
mkdir -p "$WORK"
tar -C "$ROOT" --exclude=./target --exclude=./.git -cf - . | tar -C "$WORK" -xf -

killed=0
total=0
survivors=()
for p in "${patches[@]}"; do
    name=$(basename "$p" .patch)
    total=$((total + 1))
    rm -rf "$WORK/src"
    cp -r "$ROOT/src" "$WORK/src"
    # The scratch copy lives inside this repository's target/: stop git
    # from finding the repository above it, or `git apply` would silently
    # skip every path outside the current directory.
    if ! (cd "$WORK" && GIT_CEILING_DIRECTORIES="$(dirname "$WORK")" git apply "$p") ||
        diff -rq "$ROOT/src" "$WORK/src" >/dev/null; then
        echo "mutant $name: patch does not apply (regenerate with tests/mutants/make_patches.py)"
        survivors+=("$name (does not apply)")
        continue
    fi
    cmd=$(sed -n '1s/^# kill: //p' "$p")
    start=$(date +%s)
    if ! (cd "$WORK" && CARGO_TARGET_DIR="$MUTANT_TARGET/test" eval "$cmd --no-run" >"$WORK/build.log" 2>&1); then
        echo "mutant $name: does not build"
        tail -20 "$WORK/build.log"
        survivors+=("$name (does not build)")
        continue
    fi
    (cd "$WORK" && CARGO_TARGET_DIR="$MUTANT_TARGET/test" timeout "$TIMEOUT" bash -c "$cmd" >"$WORK/run.log" 2>&1)
    rc=$?
    secs=$(($(date +%s) - start))
    if [ $rc -ne 0 ]; then
        why=$(grep -m1 -E "panicked at|HANG|deadlock|assert|FAILED" "$WORK/run.log" | cut -c1-150)
        [ $rc -eq 124 ] && why="timeout after ${TIMEOUT}s"
        echo "mutant $name: killed in ${secs}s ($why)"
        killed=$((killed + 1))
    else
        echo "mutant $name: SURVIVED ($cmd)"
        survivors+=("$name")
    fi
done

echo "mutants: $killed/$total killed"
if [ $killed -ne $total ]; then
    printf 'not killed: %s\n' "${survivors[@]}"
    exit 1
fi
