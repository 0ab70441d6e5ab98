#!/usr/bin/env bash
# A CPU profile of one `omni bench` on a machine without perf (the lent box), limited to the bench's
# measured part. Two halves:
#
#   tests/bench/perf-on-device.sh pack DIR
#       (here) copies this machine's `perf` and the libraries it links (all but libc/libm/libstdc++/
#       libgcc, which the target has) into DIR/perf.tgz (~9 MB), and the release `omni` with its
#       symbols but without debug info into DIR/omni-sym.gz (~9 MB). DIR is what `run`'s `carry`
#       takes (an ignored folder such as .devbin).
#
#   tests/bench/perf-on-device.sh profile DIR [bench arguments…]
#       (there) unpacks both, runs `omni bench …` (default: `latency --layers 48 --speech-seconds 5`)
#       under `perf record -e cpu-clock` (the VM has no PMU) with sampling switched on and off by the
#       bench itself through OMNI_PERF_CTL_FIFO (loading and the random weights are left out), and
#       writes the flat profile by symbol, by thread, and the annotated hottest symbol to
#       $OUT/perf-*.txt.
#
# What it found first (2026-11-27): 18 % of all CPU samples in candle's worker-pool spin loop
# (BENCHMARKS.md, "candle's worker pool no longer spins through the prefill").
set -eu
mode=${1:-}
dir=${2:-}
[ -n "$mode" ] && [ -n "$dir" ] || { echo "usage: $0 pack|profile DIR [bench args…]" >&2; exit 2; }
shift 2

case "$mode" in
pack)
  command -v perf >/dev/null || { echo "perf is not installed here (Debian: apt-get install linux-perf)" >&2; exit 1; }
  top=$(git rev-parse --show-toplevel)
  bin=${CARGO_TARGET_DIR:-$top/target}/release/omni
  [ -x "$bin" ] || { echo "no release omni at $bin: cargo build --release -p omni-engine --bin omni" >&2; exit 1; }
  mkdir -p "$dir"
  stage=$(mktemp -d)
  mkdir -p "$stage/perfpkg/lib"
  cp "$(command -v perf)" "$stage/perfpkg/"
  ldd "$(command -v perf)" | awk '{print $3}' | grep -v '^$' | grep -vE 'libc\.so|libm\.so|libgcc_s|libstdc\+\+' |
    while read -r lib; do cp -L "$lib" "$stage/perfpkg/lib/"; done
  tar -C "$stage" -czf "$dir/perf.tgz" perfpkg
  strip --strip-debug -o "$stage/omni-sym" "$bin"
  gzip -c "$stage/omni-sym" > "$dir/omni-sym.gz"
  rm -rf "$stage"
  ls -la "$dir/perf.tgz" "$dir/omni-sym.gz"
  ;;
profile)
  out=${OUT:-./perf-out}
  mkdir -p "$out"
  work=$(mktemp -d)
  tar -C "$work" -xzf "$dir/perf.tgz"
  gunzip -c "$dir/omni-sym.gz" > "$work/omni-sym"
  chmod +x "$work/omni-sym"
  perf="env LD_LIBRARY_PATH=$work/perfpkg/lib:${LD_LIBRARY_PATH:-} $work/perfpkg/perf"
  mkfifo "$work/ctl" "$work/ack"
  [ $# -gt 0 ] || set -- latency --layers 48 --speech-seconds 5
  OMNI_PERF_CTL_FIFO="$work/ctl" $perf record -D -1 --control "fifo:$work/ctl,$work/ack" -F 4000 -e cpu-clock \
    -o "$work/perf.data" -- "$work/omni-sym" bench "$@" > "$out/perf-bench.txt" 2>&1 || true
  $perf report -i "$work/perf.data" --stdio --no-children --sort symbol 2>/dev/null | grep -v '^#' | grep -v '^$' |
    head -80 > "$out/perf-symbols.txt"
  $perf report -i "$work/perf.data" --stdio --no-children --sort comm 2>/dev/null | grep -v '^#' | grep -v '^$' |
    head -40 > "$out/perf-threads.txt"
  hot=$(head -1 "$out/perf-symbols.txt" | sed -E 's/^ *[0-9.]+% +\[[^]]+\] +//; s/[ -]+$//')
  $perf annotate -i "$work/perf.data" --stdio -s "$hot" 2>/dev/null | grep -E '^\s+[0-9]+\.[0-9]+' | sort -rn |
    head -40 > "$out/perf-annotate.txt" || true
  rm -rf "$work"
  head -30 "$out/perf-symbols.txt"
  ;;
*)
  echo "usage: $0 pack|profile DIR [bench args…]" >&2
  exit 2
  ;;
esac
