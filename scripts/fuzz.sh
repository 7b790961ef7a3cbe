#!/usr/bin/env bash
# Fuzzes the decoders (issue 7): every cargo-fuzz target of fuzz/ for RUNS inputs each
# (default 1,000,000), two targets at a time, and a summary line per target.
#
#   scripts/fuzz.sh [RUNS] [TARGET...]        e.g. scripts/fuzz.sh 100000 frame wire
#
# Environment: FUZZ_JOBS (targets run at once, default 2), FUZZ_SANITIZER (default `none`:
# the code under test is safe Rust, so AddressSanitizer would only slow it down; `address`
# works too), FUZZ_TARGET_DIR (cargo's target dir, default fuzz/target), FUZZ_MAX_TIME
# (seconds per target: stop there even if RUNS are not done), FUZZ_CONFIG_MAX_LEN (longest
# configuration tried, default 1024 bytes).
#
# cargo-fuzz needs nightly-only compiler flags (`-Cpasses=sancov-module`, `-Z...`); with the
# stable toolchain `RUSTC_BOOTSTRAP=1` unlocks them. Crashes are kept in
# fuzz/regressions/<target>/ (the inputs libFuzzer wrote to fuzz/artifacts/), and the script
# exits 1 if there was any.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

runs="${1:-1000000}"
shift || true
jobs="${FUZZ_JOBS:-2}"
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${FUZZ_TARGET_DIR:-$root/fuzz/target}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

cd fuzz
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

# Seeds: one valid input per decoder, so that mutations start inside the format instead of
# having to find it. Corpora grow under fuzz/corpus/<target>/ and are reused by later runs.
seed() { # target name: writes stdin to fuzz/corpus/<target>/<name> unless it exists
  mkdir -p "corpus/$1"
  if [ ! -e "corpus/$1/$2" ]; then cat >"corpus/$1/$2"; else cat >/dev/null; fi
}
# payload: the first byte selects the configuration (0: json, value/ts, auto; 1: number).
printf '\000{"value": 21.5, "ts": "2023-11-14T22:13:20.123+02:00"}' | seed payload json
printf '\000{"value": "7.25", "ts": 1700000000123}' | seed payload json-ms
printf '\010{"data":{"readings":[{"v":1},{"v":2.5}]},"meta":{"time":1700000000}}' | seed payload nested
printf '\001 21.5\n' | seed payload number
# frame: the golden frame of sensors/src/frame.rs, twice, with idle fill.
golden_frame=0009012aac02c0843d0301010103ac410301010107c07f0203020209507d44010846ac3700
printf '%s%s' "$golden_frame" "$golden_frame" | xxd -r -p | seed frame golden
# config: every shipped configuration (cut to the first FUZZ_CONFIG_MAX_LEN bytes by libFuzzer)
# and a small one with a rule and labels.
for file in "$root"/config/*.toml; do seed config "$(basename "$file")" <"$file"; done
printf '[agent]\nid = "gw"\n\n[[rules]]\nkind = "threshold"\nname = "hot"\nseries = "a/temp"\nabove = 80.0\nlabels = { device = "{0}", metric = "{-1}" }\n\n[upstream]\nkind = "file"\npath = "out.jsonl"\n' \
  | seed config labels.toml
# wire: a JSON batch plain, zstd and gzip, and the golden compact batch of the wire tests.
json_batch='{"version":2,"agent":"gw","lane":"summaries","first_seq":7,"last_seq":7,"records":[{"id":"gw:beef:summaries:7","seq":7,"body":{"summary":{"series":"p/t","start_ms":60000,"window_ms":10000,"count":2,"min":1.5,"max":2.5,"mean":2.0,"stddev":0.5,"first":1.5,"last":2.5,"windows":1}}}]}'
printf '%s' "$json_batch" | seed wire json
printf '%s' "$json_batch" | gzip -c | seed wire json.gz
if command -v zstd >/dev/null 2>&1; then printf '%s' "$json_batch" | zstd -q -c | seed wire json.zst; fi
printf '%s' 02026777 01effd02 0708 02 03702f74 0b6f7574626f785f66756c6c 02 0100 91 00 c0a907 904e 02 \
  f101 9103 20 51 0200 01 0001 02 03 a09c01 a09c01 01 04 | tr -d ' ' | xxd -r -p | seed wire compact
# recording: the first byte selects the format (even: CSV, odd: JSON lines; bit 1: --series).
for file in "$root"/config/recordings/*; do
  case "$file" in
    *.csv) { printf '\000'; head -c 4000 "$file"; } | seed recording "$(basename "$file")" ;;
    *) { printf '\001'; head -c 4000 "$file"; } | seed recording "$(basename "$file")" ;;
  esac
done
printf '\002timestamp,value\n1718000000,71.5\n"2024-06-10T06:13:20Z","72"\n' | seed recording two-columns.csv

summary="$(mktemp)"
trap 'rm -f "$summary"' EXIT

run_target() { # target: builds and runs it; appends "target runs seconds crashes" to $summary
  local target="$1" log="$root/fuzz/artifacts/$1.log" start end status done_runs fuzz_seconds crashes
  mkdir -p "artifacts/$target"
  # Configurations of 12 KiB (the shipped reference) run at ~80 inputs/s, of 1 KiB at
  # ~3,000/s: the parser's paths are all reachable in 1 KiB.
  local extra=()
  if [ "$target" = config ]; then extra=(-max_len="${FUZZ_CONFIG_MAX_LEN:-1024}"); fi
  local marker
  marker="$(mktemp)"
  start="$(date +%s)"
  status=0
  cargo fuzz run -O -a --sanitizer "$sanitizer" --target-dir "$target_dir" "$target" \
    "corpus/$target" -- -runs="$runs" -timeout=10 -rss_limit_mb=2560 -print_final_stats=1 ${FUZZ_MAX_TIME:+-max_total_time=$FUZZ_MAX_TIME} "${extra[@]}" \
    >"$log" 2>&1 || status=$?
  end="$(date +%s)"
  done_runs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)"
  [ -n "$done_runs" ] || done_runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  # libFuzzer's own time when it finished (the wall time also counts `cargo fuzz run`'s build).
  fuzz_seconds="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
  crashes=0
  # Only what this run wrote: older artifacts were reported by the run that found them.
  while IFS= read -r artifact; do
    mkdir -p "regressions/$target"
    cp "$artifact" "regressions/$target/"
    crashes=$((crashes + 1))
  done < <(find "artifacts/$target" -maxdepth 1 -type f -newer "$marker" \
    \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \))
  rm -f "$marker"
  if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="failed(status $status, see $log)"; fi
  echo "$target ${done_runs:-?} ${fuzz_seconds:-$((end - start))} $crashes" >>"$summary"
}

# Build once up front so that parallel runs do not fight over cargo's lock.
cargo fuzz build -O -a --sanitizer "$sanitizer" --target-dir "$target_dir"

running=0
for target in "${targets[@]}"; do
  run_target "$target" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

echo
printf '%-10s %10s %8s  %s\n' target runs seconds crashes
sort "$summary" | while read -r target done_runs seconds crashes; do
  printf '%-10s %10s %8s  %s\n' "$target" "$done_runs" "$seconds" "$crashes"
done
! awk '$4 != "0" { found = 1 } END { exit !found }' "$summary"
