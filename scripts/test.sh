#!/usr/bin/env bash
# The CPU test suite, one pytest process per area, and per file for the kernels (a crash
# or leaked global state -- e.g. memory touched by a kernel under the Triton interpreter --
# cannot take the others down; each vLLM area still shares one engine per session).
# Extra arguments go to every pytest run. Prints one combined "N passed, N failed" line.
set -u
cd "$(dirname "$0")/.."
areas=(tests/kernels/test_*.py tests/trainer tests/vllm tests/cli tests/recipes tests/dashboard)
passed=0; failed=0; skipped=0; status=0
for a in "${areas[@]}"; do
  echo "=== $a"
  log=$(mktemp)
  python -m pytest "$a" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  for retry in 1 2; do
    # Stopgap, to be removed: native crashes and a lost custom-op schema were seen intermittently
    # on CPU (root cause not found yet; see the session notes). Say so loudly and rerun the area,
    # at most twice; the area counts only if a whole rerun passes.
    { [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; } || break
    if [ "$rc" -ge 128 ]; then why="died with signal $((rc - 128))"; else why="exited $rc"; fi
    echo "!!! $a: pytest $why; rerunning this area ($retry of 2)"
    python -m pytest "$a" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  done
  line=$(grep -E "^=+ .*(passed|failed|error).* in [0-9.]+s" "$log" | tail -1)
  p=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+"); f=$(echo "$line" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+")
  e=$(echo "$line" | grep -oE "[0-9]+ error" | grep -oE "[0-9]+"); s=$(echo "$line" | grep -oE "[0-9]+ skipped" | grep -oE "[0-9]+")
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0} + ${e:-0})); skipped=$((skipped + ${s:-0}))
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=1; [ -z "$line" ] && failed=$((failed + 1)) && echo "!!! $a: pytest exited $rc"; fi
  rm -f "$log"
done
echo "${passed} passed, ${failed} failed, ${skipped} skipped"
exit $status
