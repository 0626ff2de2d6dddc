#!/usr/bin/env bash
# Side-by-side fio figures: nbdkit's memory plugin (A) against scratchd's
# memory backend (B), alternating servers in one run (see bench/compare.py).
#   bench/compare-nbdkit.sh            # 1 and 4 connections, 3 rounds each
#   ROUNDS=5 RUNTIME=10 bench/compare-nbdkit.sh
# Needs: nbdkit, fio (apt-get install nbdkit fio). Prints two tables; the
# figures in docs/PERFORMANCE.md were made with this script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-5} SIZE=${SIZE:-1G}
cargo build --release --locked -q
for tool in nbdkit fio; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install $tool" >&2; exit 1; }
done
echo "machine: $(nproc) cores, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'), $(fio --version)"
for jobs in ${JOBS:-1 4}; do
  python3 bench/compare.py --rounds "$ROUNDS" --runtime "$RUNTIME" --size "$SIZE" --jobs "$jobs" \
    --a "nbdkit -f -U {sock} memory 4G" \
    --b "target/release/scratchd serve -U {sock} memory size=4G"
  echo
done
