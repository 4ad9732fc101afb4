#!/usr/bin/env bash
# Measures how fast an admin change reaches every connected agent (issue 4 target:
# p50 <= 250 ms, p99 <= 1 s with >= 100 agents). Starts the real controller on 127.0.0.1,
# opens N signed netmap streams (simulated agents that verify every event), makes R admin
# changes that alter every netmap, and prints the delivery latency percentiles.
#
#   scripts/propagation.sh [AGENTS] [ROUNDS]     (defaults 100 20; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
agents=${1:-100}
rounds=${2:-20}
cargo build --release -q -p skymesh-controller -p skymesh-e2e
SKYMESH_BIN_DIR="$PWD/target/release" target/release/skymesh-propagation --agents "$agents" --rounds "$rounds"
