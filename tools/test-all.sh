#!/usr/bin/env bash
# Run the test suite on every supported Python found on this machine, each in a venv of
# its own (.venv-3.X), and print one line per version. Used by `make test-all`.
#
#   SUPPORTED     the versions to run (default: every supported one, 3.10 to 3.13)
#   SKIP          versions to leave out (e.g. the one `make test` has just run)
#   REQUIRE_ALL=1 fail when a supported version is not found (CI sets it)
#   PYTEST_ARGS   passed to pytest, as with `make test`
#   CPYTHON_ASYNCIO=0  leaves out `make cpython-asyncio` (run after the suite by default)
#
# An interpreter for 3.X is python3.X on PATH, else the newest pyenv build of 3.X
# ($PYENV_ROOT/versions/3.X.*, PYENV_ROOT defaulting to ~/.pyenv).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUPPORTED=${SUPPORTED:-"3.10 3.11 3.12 3.13"}
SKIP=${SKIP:-}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}

find_python() {
    local v=$1 py
    for py in "$(command -v "python$v" 2>/dev/null)" \
              $(ls -d "$PYENV_ROOT"/versions/"$v".*/bin/python3 2>/dev/null | sort -V -r); do
        if [ -n "$py" ] && [ -x "$py" ] &&
           [ "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$v" ]; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

summary=()
status=0
cpy=""
for v in $SUPPORTED; do
    case " $SKIP " in *" $v "*) continue ;; esac
    if ! py=$(find_python "$v"); then
        summary+=("$v: not found")
        if [ "${REQUIRE_ALL:-0}" = 1 ]; then status=1; fi
        continue
    fi
    log=".test-all-$v.log"
    echo "== test-all: Python $v ($py), log in $log"
    start=$(date +%s)
    make test PYTHON="$py" VENV=".venv-$v" PYTEST_ARGS="${PYTEST_ARGS:-}" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    result=$(grep -E '^=*.* (passed|failed|error)' "$log" | tail -n 1 | sed -e 's/=//g' -e 's/^ *//')
    if [ "${CPYTHON_ASYNCIO:-1}" = 1 ]; then
        # CPython's own asyncio tests on proactor's loop (tools/cpython_asyncio.py)
        make cpython-asyncio PYTHON="$py" VENV=".venv-$v" </dev/null 2>&1 | tee -a "$log"
        crc=${PIPESTATUS[0]}
        cpy=$(grep -E '^  proactor ' "$log" | tail -n 1 | sed -e 's/^  proactor *//' -e 's/ in [0-9.]* s.*//')
        if [ "$crc" != 0 ]; then rc=$crc; fi
    fi
    secs=$(( $(date +%s) - start ))
    summary+=("$v: ${result:-no result (rc $rc)}; CPython's asyncio tests on proactor's loop: ${cpy:-not run}; ${secs} s in all")
    if [ "$rc" != 0 ]; then status=1; fi
done

echo "== test-all summary"
for line in "${summary[@]}"; do echo "   $line"; done
exit $status
