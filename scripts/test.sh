#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine with only Rust installed.
# The end-to-end tests start their own Mosquitto (on free ports, with their own config) and
# the page test its own chromedriver + headless chromium; this installs them when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests need Mosquitto; the page test needs Debian's chromium + chromedriver.
missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then missing+=(mosquitto); fi
if [ ! -x /usr/bin/chromium ]; then missing+=(chromium); fi
if [ ! -x /usr/bin/chromedriver ]; then missing+=(chromium-driver); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing from Debian: ${missing[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# proptest: enough cases to find ordering bugs, few enough for 2 cores.
export PROPTEST_CASES="${PROPTEST_CASES:-64}"
cargo build --workspace --bins
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# Doc tests first, then every test target, so that the closing lines are the real tests'.
cargo test --workspace --doc "$@" 2>&1 | tee "$log"
cargo test --workspace --all-targets "$@" 2>&1 | tee -a "$log"
echo
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
