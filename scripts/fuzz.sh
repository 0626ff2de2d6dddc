#!/usr/bin/env bash
# Runs the cargo-fuzz targets one after another (the machine is small), each
# for SECONDS (default 600), starting from the committed seeds; then reports
# executions, coverage and crashes. With --update-seeds, the grown corpus is
# minimized (cargo fuzz cmin) and the smallest inputs that still carry its
# coverage edges become the new fuzz/seeds/TARGET (see docs/RELIABILITY.md).
#
#   scripts/fuzz.sh [--update-seeds] [SECONDS] [TARGET...]
#   scripts/fuzz.sh --update-seeds 0 TARGET    # seeds from fuzz/corpus only
#
# Needs `cargo install cargo-fuzz`; RUSTC_BOOTSTRAP lets the stable
# toolchain build with the sanitizer flags cargo-fuzz passes. The working
# corpus (fuzz/corpus) and crashes (fuzz/artifacts) are not committed; a
# crash worth keeping goes to fuzz/regressions/TARGET, which the normal test
# suite replays.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
update=false
if [ "${1:-}" = "--update-seeds" ]; then update=true; shift; fi
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(negotiation request decode reply storage)
export RUSTC_BOOTSTRAP=1
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  log="logs/$t.log"
  if [ "$secs" -gt 0 ]; then
    echo "== $t: ${secs}s (log: fuzz/$log)"
    status=0
    cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" \
      -print_final_stats=1 -timeout=20 -rss_limit_mb=2048 >"$log" 2>&1 || status=$?
    grep -E '^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY:|Test unit written' "$log" || true
    if [ "$status" -ne 0 ]; then echo "!! $t failed (exit $status): see fuzz/$log"; continue; fi
  fi
  if $update; then
    cargo fuzz cmin "$t" "corpus/$t" >>"$log" 2>&1
    # Seeds: the inputs that brought a new coverage edge when libFuzzer
    # merges the corpus smallest first (its control file lists, per input,
    # the edges no earlier input reached): all edges, few small files.
    tmp=$(mktemp -d)
    cargo fuzz run "$t" "$tmp" "corpus/$t" -- -merge=1 -merge_control_file="$tmp.ctl" >>"$log" 2>&1
    rm -rf "seeds/$t"; mkdir -p "seeds/$t"
    python3 - "$tmp.ctl" "seeds/$t" <<'PY'
import shutil, sys
lines = open(sys.argv[1]).read().split("\n")
n = int(lines[0])
files = lines[2:2 + n]
for line in lines[2 + n:]:
    f = line.split()
    if len(f) > 2 and f[0] == "COV":
        shutil.copy(files[int(f[1])], sys.argv[2])
PY
    rm -rf "$tmp" "$tmp.ctl"
    echo "   seeds: $(ls "seeds/$t" | wc -l) files, $(cat "seeds/$t"/* | wc -c) bytes"
  fi
done
