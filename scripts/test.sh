#!/usr/bin/env bash
# All of the project's tests, as README.md documents them:
#   1. cargo build --release       the binary the integration tests drive
#   2. cargo test --release        unit and stage tests next to the code
#   3. pytest integration-tests    the real node against DCMTK, pynetdicom and raw sockets
#   4. packaging/test-deb.sh       build the .deb, dpkg -i, run the installed service, C-ECHO/C-STORE, dpkg -r
#   5. pytest models/training/tests  (when that directory exists)
#   6. scripts/fuzz.sh             a bounded fuzz run (when that script exists)
# Every step runs even if an earlier one failed (except that nothing runs
# without a binary); the exit status is non-zero if any step failed.
#
# Unit tests use the release profile so they share the dependency build with
# step 1: a second (debug) build of dicom-pixeldata's C/C++ codecs would cost
# minutes on CI's two cores and test nothing extra.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"

declare -a results=()
failed=0

run_step() {
    local name="$1"
    shift
    echo
    echo "==> $name: $*"
    local start=$SECONDS
    "$@"
    local rc=$?
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        results+=("$name: ok (${took}s)")
    else
        results+=("$name: FAILED with status $rc (${took}s)")
        failed=1
    fi
    return "$rc"
}

# pytest exits 5 when it collected no tests: that is a failure for the
# integration suite (it must never be empty) but fine for an optional,
# still-empty test directory.
pytest_optional_dir() {
    "$PY" -m pytest "$1" -v
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "(no tests collected in $1)"
        return 0
    fi
    return "$rc"
}

if ! run_step "cargo build --release" cargo build --release; then
    echo "build failed: skipping the tests that need the binary"
else
    run_step "unit tests" cargo test --release
    run_step "integration tests" "$PY" -m pytest integration-tests -v
    # After the integration tests: it installs the package system-wide and
    # uses port 11112, so nothing else may run beside it.
    run_step "deb package" bash packaging/test-deb.sh
fi

if [ -d models/training/tests ]; then
    run_step "training tests" pytest_optional_dir models/training/tests
fi

if [ -f scripts/fuzz.sh ]; then
    run_step "fuzz (bounded)" bash scripts/fuzz.sh
fi

echo
echo "==> test.sh summary"
for r in "${results[@]}"; do
    echo "    $r"
done
exit "$failed"
