#!/usr/bin/env bash
# Writes the man pages of loopfuse (loopfuse.1 and loopfuse-COMMAND.1), generated from its
# clap definitions, into DIR (default: target/man). View one with 'man -l DIR/loopfuse.1'.
set -euo pipefail
cd "$(dirname "$0")/.."
directory=${1:-target/man}

cargo build --quiet
target/debug/loopfuse man "$directory"
