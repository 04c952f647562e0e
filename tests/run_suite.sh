#!/usr/bin/env bash
# The whole suite as two pytest processes side by side: the Ray lane (-m "ray or cluster"), whose many short
# Ray processes leave the CPU idle about a third of the time while they start, and beside it, at the lowest
# priority, every test that uses no Ray (the fast lane plus the slow in-process ones: exports, browser pages).
# The two -m expressions are each other's negation: every test runs exactly once. The Ray lane prints as it
# goes, the other lane's report follows; the exit status is non-zero if either lane failed. Arguments go to
# both pytest processes (e.g. --durations=20, or test files: a lane that selects none of them is no failure);
# -m is this script's. Run from the repository root; PYTHON picks the interpreter (default .venv/bin/python).
set -uo pipefail
py="${PYTHON:-.venv/bin/python}"
ray="ray or cluster"
work="$(mktemp -d "${TMPDIR:-/tmp}/da-suite.XXXXXX")"
other_log="$work/no_ray_lane.log"

# Niceness 19: the lane takes the CPU the Ray lane leaves idle and slows that lane little. At the default
# priority it would take the CPU from Ray's workers (niceness 15, Ray's default): the suite measured 603-613 s
# that way, 533 s this way, 653-666 s with one pytest (docs/development.md). Each lane has its own basetemp.
nice -n 19 "$py" -m pytest -q -m "not ($ray)" --basetemp="$work/no_ray" "$@" >"$other_log" 2>&1 &
other_pid=$!
trap 'kill "$other_pid" 2>/dev/null' INT TERM
echo "the tests without Ray run beside (pid $other_pid, log $other_log); the Ray lane (-m \"$ray\"):"
"$py" -m pytest -q -m "$ray" --basetemp="$work/ray" "$@"
ray_rc=$?
wait "$other_pid"
other_rc=$?
echo
echo "the lane without Ray (-m \"not ($ray)\"), run beside:"
cat "$other_log"

ok() { [ "$1" -eq 0 ] || [ "$1" -eq 5 ]; }  # 5: pytest selected no test in this lane
if ok "$ray_rc" && ok "$other_rc" && ! { [ "$ray_rc" -eq 5 ] && [ "$other_rc" -eq 5 ]; }; then
    rm -rf "$work"
    echo "suite passed (Ray lane exit $ray_rc, the other lane exit $other_rc)"
    exit 0
fi
echo "suite FAILED: Ray lane exit $ray_rc, the other lane exit $other_rc (temporary files kept in $work)"
exit 1
