#!/usr/bin/env bash
# Side-by-side timing of the engine's own Q8_0 kernels (engine/src/quant) against candle's QMatMul
# path (`OMNI_CANDLE_MATMUL=1`), same binary, same machine, one run, real shapes on random Q8_0
# weights made in memory:
#
#   OUT=/some/dir tests/bench/compare-kernels.sh /path/to/omni [threads]
#
# Each pair runs the candle path first, then ours. Budget ~8 minutes on 16 cores.
set -u
BIN=${1:-./omni}
THREADS=${2:-16}
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${BUDGET:-500}
{
  echo "date: $(date -u +%FT%TZ)"
  grep -m1 'model name' /proc/cpuinfo
  echo "nproc: $(nproc), threads: $THREADS"
  grep -o -w 'avx2\|avx512f\|avx512_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' '
  echo
} > "$OUT/machine.txt" 2>&1

# pair NAME TIMEOUT ARGS...: the bench twice, candle path then ours.
pair() {
  local name=$1 limit=$2
  shift 2
  for path in candle omni; do
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
      echo "== $name/$path: skipped, budget spent" | tee -a "$OUT/summary.txt"
      continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local env=""
    [ "$path" = candle ] && env="OMNI_CANDLE_MATMUL=1"
    local t0=$(date +%s)
    echo "== $name/$path: $env $BIN bench $* (timeout ${limit}s)" | tee -a "$OUT/summary.txt"
    env $env timeout "$limit" "$BIN" bench "$@" --threads "$THREADS" --json \
      > "$OUT/$name-$path.json" 2> "$OUT/$name-$path.log"
    echo "   rc=$? in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
    grep -v -E '^\s*$|INFO|WARN' "$OUT/$name-$path.log" | tail -16 >> "$OUT/summary.txt"
  done
}

pair thinker8 90 thinker --layers 8 --prompt-tokens 128 --gen 8
pair speech 120 speech --frames 60 --prefill-rows 80
pair latency 200 latency --layers 48 --speech-seconds 5
pair conversation 150 latency --conversation --layers 48 --speech-seconds 5
echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/summary.txt"
