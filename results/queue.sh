#!/usr/bin/env bash
# Runs the `train` lines read from standard input, two at a time (one per core, one thread each), each line
# being the flags of one `pipeline.py train`. --jobs 1 --threads 1 per run, so the numbers do not depend on
# how the lines share the cores (tested: --jobs does not change a number). Each run is resumable: a finished
# seed (seed-<s>.json) is never trained again, an unfinished one continues.
#   LANES=1 bash results/x.sh   runs one at a time
set -euo pipefail
cd "$(dirname "$0")/.."
# A line that fails (its error is printed) does not stop the others; the exit code says whether any failed.
grep -v '^\s*\(#\|$\)' | xargs -P "${LANES:-2}" -L 1 bash -c \
  'echo "[$(date +%T)] start: $*"; python pipeline.py train --jobs 1 --threads 1 "$@" > /dev/null; code=$?
   if [ $code -eq 0 ]; then echo "[$(date +%T)] done: $*"; else echo "[$(date +%T)] FAILED (exit $code): $*"; exit 1; fi' _
