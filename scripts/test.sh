#!/usr/bin/env bash
# The CPU test suite, one pytest process per area, and per file for the kernels (leaked
# global state cannot reach the other areas; each vLLM area still shares one engine per
# session). Nothing is rerun: an area that fails or crashes fails the suite, with a "!!!"
# line. Extra arguments go to every pytest run. Prints one combined "N passed, N failed" line.
set -u
cd "$(dirname "$0")/.."
areas=(tests/kernels/test_*.py tests/trainer tests/vllm tests/cli tests/recipes tests/dashboard)
passed=0; failed=0; skipped=0; status=0
for a in "${areas[@]}"; do
  echo "=== $a"
  log=$(mktemp)
  python -m pytest "$a" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  line=$(grep -E "^(=+ )?[0-9]+ [a-z]+.* in [0-9.]+s" "$log" | tail -1)  # with or without -q
  p=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+"); f=$(echo "$line" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+")
  e=$(echo "$line" | grep -oE "[0-9]+ error" | grep -oE "[0-9]+"); s=$(echo "$line" | grep -oE "[0-9]+ skipped" | grep -oE "[0-9]+")
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0} + ${e:-0})); skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ]; then
    # No reruns: a crash, a failure, or an area that collected no test (pytest's exit 5: every
    # area here has tests, so none means a broken path or marker) fails the suite, loudly.
    status=1
    if [ "$rc" -ge 128 ]; then echo "!!! $a: pytest died with signal $((rc - 128))"
    elif [ "$rc" -eq 5 ]; then echo "!!! $a: no test collected"
    else echo "!!! $a: pytest exited $rc"; fi
    [ -z "$line" ] || [ "$rc" -eq 5 ] && failed=$((failed + 1))
  fi
  rm -f "$log"
done
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
exit $status
