#!/usr/bin/env bash
# Run `chelsea eval` on the GPU machine with the built-in Qwen model carried in pieces
# (scripts/device_model.sh says how they travel).
#
#   usage: bash scripts/device_eval.sh SECONDS NAME [chelsea eval options...]
#
# runs the eval (resumable) into /tmp/eval/NAME and copies it to $OUT/NAME at the end of every
# call, so a run cut by the time limit continues in the next call on the same machine. To resume on
# a fresh machine, copy the previous results.jsonl and runs.json to .gpu/resume/NAME/ and carry it.
set -u
limit=$1; name=$2; shift 2
mkdir -p /tmp/eval/"$name"
if [ -d .gpu/resume/"$name" ] && [ ! -f /tmp/eval/"$name"/results.jsonl ]; then cp .gpu/resume/"$name"/* /tmp/eval/"$name"/; fi
source scripts/device_model.sh || exit 0
timeout "$limit" python3 -m chelsea.cli eval --model qwen2.5-coder-0.5b --out /tmp/eval/"$name" "$@" 2>&1 \
  | tr '\r' '\n' | grep -v -E "Converting|Loading weights|^eval: .*it/s\]$" | tail -40
mkdir -p "$OUT/$name" && cp -r /tmp/eval/"$name"/. "$OUT/$name/"
wc -l /tmp/eval/"$name"/results.jsonl
