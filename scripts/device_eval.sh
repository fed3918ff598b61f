#!/usr/bin/env bash
# Run `chelsea eval` on the GPU machine with the built-in Qwen model carried in pieces.
#
# The model file travels in $PARTS pieces (default 10: .gpu/qwen.part0..9, made with
# `split -n 10 -d -a 1 <qwen gguf> .gpu/qwen.part`, each small enough to travel with the working
# tree), one per call; each call moves its piece to /tmp/q. Once all are there they are joined into
# $CHELSEA_CACHE_DIR and gguf is installed from .whl (`pip download --no-deps gguf -d .whl`); carry
# .gpu and .whl. The haystack is the one shipped in the package.
#
#   usage: bash scripts/device_eval.sh SECONDS NAME [chelsea eval options...]
#
# runs the eval (resumable) into /tmp/eval/NAME and copies it to $OUT/NAME at the end of every
# call, so a run cut by the time limit continues in the next call on the same machine. To resume on
# a fresh machine, copy the previous results.jsonl and runs.json to .gpu/resume/NAME/ and carry it.
set -u
limit=$1; name=$2; shift 2
mkdir -p /tmp/q /tmp/eval/"$name"
if [ -d .gpu/resume/"$name" ] && [ ! -f /tmp/eval/"$name"/results.jsonl ]; then cp .gpu/resume/"$name"/* /tmp/eval/"$name"/; fi
mv .gpu/qwen.part* /tmp/q/ 2>/dev/null
export CHELSEA_CACHE_DIR=/tmp/chelsea-cache
target=$CHELSEA_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
if [ ! -f "$target" ]; then
  if [ "$(ls /tmp/q | wc -l)" -lt "${PARTS:-10}" ]; then ls -la /tmp/q; exit 0; fi
  mkdir -p $CHELSEA_CACHE_DIR && cat $(ls /tmp/q/qwen.part* | sort -V) > "$target" && rm -rf /tmp/q
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout "$limit" python3 -m chelsea.cli eval --model qwen2.5-coder-0.5b --out /tmp/eval/"$name" "$@" 2>&1 \
  | tr '\r' '\n' | grep -v -E "Converting|Loading weights|^eval: .*it/s\]$" | tail -40
mkdir -p "$OUT/$name" && cp -r /tmp/eval/"$name"/. "$OUT/$name/"
wc -l /tmp/eval/"$name"/results.jsonl
