#!/usr/bin/env bash
# Run `chelsea eval` on the GPU machine with the built-in Qwen model carried in pieces.
#
# The model file travels in 8 pieces (.gpu/qwen.part0..7, made with
# `split -n 8 -d -a 1 <qwen gguf> .gpu/qwen.part`), one per call; each call moves its piece to
# /tmp/q. Once all are there they are joined into $CHELSEA_CACHE_DIR, gguf is installed from .whl
# (`pip download --no-deps gguf -d .whl`), the haystack is read from .gpu/haystack (a copy of
# shared/data/haystack, which does not travel by itself), and the eval runs (resumable) into
# /tmp/eval-run, copied to $OUT/eval at the end of every call. Carry .gpu/haystack and .whl in the
# calls that run the eval. To resume on a fresh machine, copy the previous results.jsonl to
# .gpu/resume.jsonl (and runs.json to .gpu/resume-runs.json, so the record of earlier invocations
# continues) and carry them too.
#   usage: bash scripts/device_eval.sh SECONDS [chelsea eval options...]
set -u
limit=$1; shift
mkdir -p /tmp/q /tmp/eval-run
if [ -f .gpu/resume.jsonl ] && [ ! -f /tmp/eval-run/results.jsonl ]; then cp .gpu/resume.jsonl /tmp/eval-run/results.jsonl; fi
if [ -f .gpu/resume-runs.json ] && [ ! -f /tmp/eval-run/runs.json ]; then cp .gpu/resume-runs.json /tmp/eval-run/runs.json; fi
mv .gpu/qwen.part* /tmp/q/ 2>/dev/null
export CHELSEA_CACHE_DIR=/tmp/chelsea-cache
target=$CHELSEA_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
if [ ! -f "$target" ]; then
  if [ "$(ls /tmp/q | wc -l)" -lt 8 ]; then ls -la /tmp/q; exit 0; fi
  mkdir -p $CHELSEA_CACHE_DIR && cat /tmp/q/qwen.part{0..7} > "$target" && rm -rf /tmp/q
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
export CHELSEA_HAYSTACK=$PWD/.gpu/haystack
timeout "$limit" python3 -m chelsea.cli eval --model qwen2.5-coder-0.5b --out /tmp/eval-run "$@" 2>&1 \
  | tr '\r' '\n' | grep -v -E "Converting|Loading weights|^eval: .*it/s\]$" | tail -40
mkdir -p "$OUT/eval" && cp -r /tmp/eval-run/. "$OUT/eval/"
wc -l /tmp/eval-run/results.jsonl
