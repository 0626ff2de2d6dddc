#!/usr/bin/env bash
# Multi-conn scaling on ONE build scratch disk: fio's nbd engine, 4k randwrite
# and randread at iodepth 32, with 1, 2 and 4 connections (fio jobs, each on
# its own --offset_increment slice so they never overlap) to the build name
# `build-1` of `scratchd serve tmpdisk size=4G type=none`. The same runs
# against `nbdkit memory 4G` give a reference (nbdkit's tmpdisk plugin cannot
# take part: it gives every connection its own fresh disk, so there is no
# multi-conn to measure).
#
#   bench/multiconn-scaling.sh                       # 3 rounds, 5 s per run
#   ROUNDS=5 RUNTIME=10 CONNS="1 2 4 8" bench/multiconn-scaling.sh
#
# Servers alternate A B B A ... per round; each round starts fresh servers,
# fills the whole disk with 1M writes (untimed, so randread reads data, not
# holes) and then runs randwrite and randread for every connection count.
# A tmpdisk disk is destroyed when its last connection closes, and every fio
# job connects on its own, so a "holder" connection (python libnbd, idle) is
# kept open for the whole round. Server CPU per op = (utime+stime of the
# server process after - before) / operations fio completed, as in
# bench/compare.py. Prints medians of the rounds.
# Needs: fio, nbdkit, jq, python3-libnbd for /usr/bin/python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} RUNTIME=${RUNTIME:-5} CONNS=${CONNS:-"1 2 4"}
SLICE=${SLICE:-1G}   # per-job region; 4 jobs x 1G = the whole 4G disk
PY=/usr/bin/python3  # the system python has the nbd module (pyenv's does not)
for tool in fio nbdkit jq; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install $tool" >&2; exit 1; }
done
"$PY" -c 'import nbd' 2>/dev/null || { echo "apt-get install python3-libnbd" >&2; exit 1; }
cargo build --release --locked -q
SCRATCHD=$PWD/target/release/scratchd

work=$(mktemp -d /tmp/multiconn.XXXXXX)
server_pid="" holder_pid=""
stop_pid() { # stop one process we started, by pid
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$holder_pid"; holder_pid=""
  stop_pid "$server_pid"; server_pid=""
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

declare -A TEMPLATE=(
  [scratchd]="$SCRATCHD serve -U {sock} tmpdisk size=4G type=none"
  [nbdkit]="nbdkit -f -U {sock} memory 4G"
)
HZ=$(getconf CLK_TCK)
results=$work/results.tsv
: >"$results"

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; } # utime+stime

start_server() { # name -> sets server_pid, sock
  sock=$work/$1.sock
  rm -f "$sock"
  ${TEMPLATE[$1]//\{sock\}/$sock} >"$work/$1.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  [ -S "$sock" ] || { echo "$1 did not start:"; cat "$work/$1.log"; exit 1; } >&2
  uri="nbd+unix:///build-1?socket=$sock"
  # The holder: keeps the tmpdisk disk alive between fio runs.
  "$PY" -c 'import nbd, sys, time
h = nbd.NBD(); h.set_export_name("build-1"); h.connect_unix(sys.argv[1])
print("ready", flush=True); time.sleep(1e6)' "$sock" >"$work/holder" &
  holder_pid=$!
  for _ in $(seq 100); do grep -q ready "$work/holder" 2>/dev/null && break; sleep 0.05; done
  grep -q ready "$work/holder" || { echo "holder connection failed" >&2; exit 1; }
}

stop_server() { stop_pid "$holder_pid"; holder_pid=""; stop_pid "$server_pid"; server_pid=""; }

fio_run() { # rw bs jobs -> json on stdout
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$1" --bs="$2" --iodepth=32 \
    --numjobs="$3" --size="$SLICE" --offset_increment="$SLICE" --group_reporting \
    --output-format=json "${@:4}"
}

measure() { # server round
  start_server "$1"
  fio_run write 1M 4 >/dev/null # fill all 4 slices: reads below hit data
  for n in $CONNS; do
    for rw in randwrite randread; do
      t0=$(cpu_ticks "$server_pid")
      fio_run "$rw" 4k "$n" --runtime="$RUNTIME" --time_based >"$work/fio.out"
      sed -n '/^{/,$p' "$work/fio.out" >"$work/fio.json" # drop "fio: connected to NBD server"
      t1=$(cpu_ticks "$server_pid")
      jq -r --arg s "$1" --arg rw "$rw" --argjson n "$n" --argjson t "$((t1 - t0))" --argjson hz "$HZ" \
        '.jobs[0] | (.read.total_ios + .write.total_ios) as $ops |
         [$s, $rw, $n, .read.iops + .write.iops, (.read.bw_bytes + .write.bw_bytes) / 1e6,
          ($t / $hz * 1e6 / $ops)] | @tsv' "$work/fio.json" >>"$results"
    done
  done
  stop_server
}

echo "machine: $(nproc) cores, $(uname -r), nbdkit $(nbdkit --version | awk '{print $2}'), $(fio --version)"
echo "rounds=$ROUNDS runtime=${RUNTIME}s conns=\"$CONNS\" slice=$SLICE per job, 4k, iodepth 32"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="scratchd nbdkit"; else order="nbdkit scratchd"; fi
  for s in $order; do measure "$s" "$r"; done
  echo "round $r/$ROUNDS done" >&2
done

"$PY" - "$results" "$ROUNDS" <<'PY'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
acc = {}
for s, rw, n, iops, mbps, us in rows:
    acc.setdefault((s, rw, int(n)), []).append((float(iops), float(mbps), float(us)))
print(f"\nmedians of {sys.argv[2]} rounds; server CPU = user+sys of the server process per fio op")
print("scratchd = scratchd serve tmpdisk size=4G type=none, export build-1 (one shared disk)")
print("nbdkit   = nbdkit memory 4G (reference; nbdkit tmpdisk has no multi-conn)")
print(f"{'workload':<10}{'conns':>6}{'scratchd IOPS':>15}{'MB/s':>7}{'us/op':>7}"
      f"{'nbdkit IOPS':>13}{'MB/s':>7}{'us/op':>7}{'IOPS s/n':>10}")
for rw in ("randwrite", "randread"):
    for n in sorted({k[2] for k in acc}):
        m = {s: [statistics.median(x) for x in zip(*acc[(s, rw, n)])] for s in ("scratchd", "nbdkit")}
        a, b = m["scratchd"], m["nbdkit"]
        print(f"{rw:<10}{n:>6}{a[0]:>15.0f}{a[1]:>7.0f}{a[2]:>7.2f}{b[0]:>13.0f}{b[1]:>7.0f}{b[2]:>7.2f}"
              f"{a[0] / b[0]:>10.2f}")
PY
