#!/usr/bin/env bash
# Memory benchmark (issue 8): the release agent with the simulated source at 1 reading per
# second per series and 3 rules matching every series, for 100, 1,000 and 10,000 series, then
# 1,000 series with the upstream down (a growing backlog). Samples VmRSS every second and
# prints, per case, the peak and the steady RSS (median of the last third of the run), the
# bytes the agent wrote to disk per event and per second (/proc/PID/io write_bytes over the
# run: what reaches the SD card) and its journal commits (fsyncs) per second.
#
#   scripts/rss.sh [SECONDS]        default 90 seconds per case
#
# Environment: EDGEWISE_BIN (default target/release/edgewise, built when missing),
# RSS_CASES (default "100 1000 10000 backlog"), RSS_EXTRA_TOML (appended to each case's config,
# e.g. '[storage]\ncache_capacity = "4 MiB"' to compare settings), RSS_ENV (the agent's extra
# environment, NAME=VALUE words; the agent tunes glibc's malloc itself, as it runs everywhere:
# RSS_ENV=EDGEWISE_MALLOC=default measures glibc's defaults).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-90}"
bin="${EDGEWISE_BIN:-target/release/edgewise}"
if [ ! -x "$bin" ]; then cargo build --release -p edgewise; fi
work="$(mktemp -d)"
echo "rss.sh: agent environment: ${RSS_ENV:-(none: the malloc tuning of the agent itself)}" >&2
trap 'rm -rf "$work"' EXIT

run_case() {
  local name="$1" series="$2" upstream="$3"
  local dir="$work/$name"
  mkdir -p "$dir"
  cat > "$dir/edgewise.toml" <<EOF
[agent]
id = "rss-$name"
data_dir = "$dir/data"
status_interval = "0s"

[api]
listen = "off"

[[sources]]
kind = "simulated"
name = "sim"
devices = $((series / 2))
metrics = ["temperature", "vibration"]
interval = "1s"
faults = true

[[rules]]
kind = "threshold"
name = "high"
series = "pump-*/*"
above = 80.0
clear = 75.0

[[rules]]
kind = "rate_of_change"
name = "jump"
series = "pump-*/*"
max_rate = 10.0
per = "1s"

[[rules]]
kind = "missing_data"
name = "silent"
series = "pump-*/*"
timeout = "30s"

$upstream

$(printf '%b' "${RSS_EXTRA_TOML:-}")
EOF
  "$bin" check --config "$dir/edgewise.toml" >/dev/null
  # shellcheck disable=SC2086 # RSS_ENV is a list of NAME=VALUE words
  env ${RSS_ENV:-} "$bin" run --config "$dir/edgewise.toml" >"$dir/log" 2>&1 &
  local pid=$!
  local samples=()
  sleep 0.2
  local written0
  written0="$(awk '/^write_bytes:/ { print $2 }' "/proc/$pid/io" 2>/dev/null || echo 0)"
  local written=0
  for _ in $(seq 1 "$secs"); do
    sleep 1
    local rss
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
    [ -n "$rss" ] && samples+=("$rss")
    if (( ${#samples[@]} % 60 == 0 )); then
      printf '  %s: %3d s rss_kb=%s data_dir_kb=%s\n' "$name" "${#samples[@]}" "$rss" \
        "$(du -sk "$dir/data" | cut -f1)" >&2
    fi
    written="$(awk '/^write_bytes:/ { print $2 }' "/proc/$pid/io" 2>/dev/null || echo "$written")"
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local n=${#samples[@]}
  local peak steady
  peak="$(printf '%s\n' "${samples[@]}" | sort -n | tail -1)"
  steady="$(printf '%s\n' "${samples[@]:$((n * 2 / 3))}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
  local disk
  disk="$(du -sk "$dir/data" | cut -f1)"
  local per_event=$(( (written - written0) / (series * secs) ))
  local per_s=$(( (written - written0) / secs / 1024 ))
  # Journal group commits (each one fsync) from the agent's `final status` line.
  local commits
  commits="$(grep -o 'commits=[0-9]*' "$dir/log" | tail -n1 | cut -d= -f2)"
  printf '%-8s series=%-6s peak_rss_kb=%-7s steady_rss_kb=%-7s data_dir_kb=%-7s written_bytes_per_event=%-5s written_kb_per_s=%-5s commits_per_s=%s\n' \
    "$name" "$series" "$peak" "$steady" "$disk" "$per_event" "$per_s" \
    "$(awk -v c="${commits:-0}" -v s="$secs" 'BEGIN { printf "%.1f", c / s }')"
}

file_upstream() { printf '[upstream]\nkind = "file"\npath = "%s"\n' "$work/$1.jsonl"; }
down_upstream='[upstream]
kind = "http"
url = "http://127.0.0.1:9/unreachable"'

for case in ${RSS_CASES:-100 1000 10000 backlog}; do
  case "$case" in
    backlog) run_case backlog 1000 "$down_upstream" ;;
    *) run_case "s$case" "$case" "$(file_upstream "s$case")" ;;
  esac
done
