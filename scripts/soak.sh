#!/usr/bin/env bash
# Soak run of the lock and prune concurrency test (test/concurrency.test.ts) with large counts:
# many waves of overlapping import/export/check/prune processes (kills, skewed clocks, another
# host name) and many backups of the fixture deployment overlapping check and forget --prune.
# Override the counts from the environment; CONCURRENCY_SEED replays a run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONCURRENCY_ITERATIONS="${CONCURRENCY_ITERATIONS:-60}"
export CONCURRENCY_DOCKER_ITERATIONS="${CONCURRENCY_DOCKER_ITERATIONS:-10}"
echo "soak: ${CONCURRENCY_ITERATIONS} waves, ${CONCURRENCY_DOCKER_ITERATIONS} deployment backups${CONCURRENCY_SEED:+, seed $CONCURRENCY_SEED}"
start=$(date +%s)
node --test --test-concurrency=1 dist/test/concurrency.test.js
echo "soak: passed in $(( $(date +%s) - start )) s"
