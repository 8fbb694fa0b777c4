#!/bin/sh
# A minimal judge: run SOLUTION on every tests/N.in, compare with tests/N.out, print a verdict
# per test from the isolate-style meta file sandboxctl writes.  Exit 0 when all pass.
#     docs/examples/judge.sh solution.py tests/ [TIME] [MEMORY]
set -u
solution=$1 tests=$2 time=${3:-2s} memory=${4:-256M}
meta=$(mktemp) out=$(mktemp)
trap 'rm -f "$meta" "$out"' EXIT
failed=0
for input in "$tests"/*.in; do
    name=$(basename "$input" .in)
    sandboxctl run "$solution" --stdin-file "$input" --timeout "$time" --cpu "$time" --memory "$memory" \
        --no-stream --meta "$meta" >"$out" 2>/dev/null
    status=$(sed -n 's/^status://p' "$meta")
    cpu=$(sed -n 's/^time://p' "$meta")
    case $status in
        "") if cmp -s "$out" "$tests/$name.out"; then verdict=AC; else verdict=WA; fi ;;
        TO) verdict=TLE ;;
        XX) verdict="internal error ($(sed -n 's/^message://p' "$meta"))" ;;
        *)  verdict="RE ($(sed -n 's/^message://p' "$meta")$(sed -n 's/^exitcode:/exit /p' "$meta"))" ;;
    esac
    if grep -q '^cg-oom-killed:1' "$meta"; then verdict=MLE; fi
    [ "$verdict" = AC ] || failed=$((failed + 1))
    printf '%-12s %-40s %ss\n' "$name" "$verdict" "$cpu"
done
[ "$failed" -eq 0 ]
