#!/usr/bin/env bash
# Runs every `omni bench` at the real model's shapes on random Q8_0 weights made in memory (no files
# needed), at full size with 16 threads, writing JSON + logs into $OUT. Needs only bash and the
# (stripped, release) `omni` binary:
#
#   OUT=/some/dir tests/bench/device.sh /path/to/omni [threads]
#
# Budget (16 cores, 128 GiB): < 8 minutes in all. The whole Q8_0 Thinker (~35 GB) is generated in
# memory by each Thinker bench (tens of seconds on 16 threads); each step has its own timeout and a
# reduced-layer fallback (extrapolated, and says so in its output) if the full one fails.
set -u
BIN=${1:-./omni}
THREADS=${2:-16}
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
START=$(date +%s)

if [ ! -x "$BIN" ]; then
  echo "device.sh: $BIN is not an executable omni binary" >&2
  exit 2
fi

{
  echo "date: $(date -u +%FT%TZ)"
  echo "binary: $BIN ($(stat -c %s "$BIN" 2>/dev/null) bytes)"
  echo "threads: $THREADS"
  echo "nproc: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo
  grep -c ^processor /proc/cpuinfo | sed 's/^/logical cpus: /'
  grep -E 'MemTotal|MemAvailable' /proc/meminfo
  cat /proc/loadavg
  command -v lscpu >/dev/null && lscpu
} > "$OUT/machine.txt" 2>&1

# run NAME TIMEOUT ARGS...: JSON on stdout → NAME.json, table + logs → NAME.log.
# Every step's timeout is cut to what is left of BUDGET seconds (the device allows 8 minutes).
BUDGET=${BUDGET:-450}
run() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, budget spent" | tee -a "$OUT/summary.txt"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  echo "== $name: $BIN bench $* (timeout ${limit}s)" | tee -a "$OUT/summary.txt"
  RUST_LOG=info timeout "$limit" "$BIN" bench "$@" --threads "$THREADS" --json > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  # The table is the log's tail (stderr); keep it in the summary.
  grep -v -E '^\s*$|INFO|WARN' "$OUT/$name.log" | tail -30 >> "$OUT/summary.txt"
  return $rc
}

# 1. Smoke + safety net: Thinker on 4 of 48 layers (extrapolated; ~3.5 GB, well under a minute).
run thinker-4layers 90 thinker --layers 4 --prompt-tokens 128 --gen 8

# 2. Speech chain: Talker + code predictor + streaming Code2Wav (~3.7 GB of weights).
run speech 120 speech --frames 100 --prefill-rows 80

# 3. Latency end of speech → first audio, all stages, all 48 layers (~40 GB of weights made in memory);
#    fallback 8 layers (extrapolated) if the full one fails.
run latency 180 latency --layers 48 --speech-seconds 5 \
  || run latency-8layers 120 latency --layers 8 --speech-seconds 5

# 4. The same turn through the streaming conversation API (Thinker and Talker threads), 48 layers.
run latency-conversation 150 latency --conversation --layers 48 --speech-seconds 5

# 5. Thinker prefill/decode, all 48 layers (~35 GB).
run thinker 180 thinker --layers 48 --prompt-tokens 256 --gen 16

# 6. With time left: the speech chain on the physical core count, if it differs from THREADS.
PHYS=$(lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l)
if [ "${PHYS:-0}" -gt 0 ] && [ "$PHYS" != "$THREADS" ]; then
  THREADS=$PHYS run speech-${PHYS}threads 90 speech --frames 60 --prefill-rows 80
fi

echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
