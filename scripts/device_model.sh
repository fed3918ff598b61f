#!/usr/bin/env bash
# Source on the GPU machine: joins the built-in Qwen model carried in pieces and sets up the
# environment for `chelsea` (CHELSEA_CACHE_DIR, gguf from .whl on PYTHONPATH).
#
# The model file travels in $PARTS pieces (default 10: .gpu/qwen.part0..9, made with
# `split -n 10 -d -a 1 <qwen gguf> .gpu/qwen.part`, each small enough to travel with the working
# tree), one per call; each call moves its piece to /tmp/q. Once all are there they are joined into
# $CHELSEA_CACHE_DIR; gguf is installed from .whl (`pip download --no-deps gguf -d .whl`); carry
# .gpu and .whl. Returns 1 (sourced) while pieces are missing.
mkdir -p /tmp/q
mv .gpu/qwen.part* /tmp/q/ 2>/dev/null
export CHELSEA_CACHE_DIR=/tmp/chelsea-cache
target=$CHELSEA_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
if [ ! -f "$target" ]; then
  if [ "$(ls /tmp/q | wc -l)" -lt "${PARTS:-10}" ]; then ls -la /tmp/q; return 1 2>/dev/null || exit 0; fi
  mkdir -p $CHELSEA_CACHE_DIR && cat $(ls /tmp/q/qwen.part* | sort -V) > "$target" && rm -rf /tmp/q
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
