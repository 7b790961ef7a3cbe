#!/usr/bin/env bash
# End-to-end load benchmark (see tests/src/bin/edgewise-load.rs). Builds release binaries,
# then runs the bare-subscriber ceiling and the agent 3 times per QoS on fresh brokers.
# Usage: scripts/load.sh [--messages N] [--series N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p edgewise -p edgewise-tests --bins
for qos in 0 1; do
  for run in 1 2 3; do
    echo "# qos=$qos run=$run"
    ./target/release/edgewise-load --qos "$qos" "$@"
  done
done
