#!/usr/bin/env bash
# Source on the GPU machine: sets up the environment for `chelsea` (gguf from .whl, the package on
# PYTHONPATH, CHELSEA_CACHE_DIR) and gathers the built-in Qwen model carried in pieces.
#
# The model file travels in $PARTS pieces (default 13: made with
# `split -n 13 -d -a 2 <qwen gguf> qwen.part`, 37.8 MB each; one piece, the tokenizer (2.1 MB) and
# the working tree must stay under the 64 MiB a call carries, and the tree is about 24 MB since
# 2026-12-08: 12 pieces of 41 MB no longer fit beside the tokenizer),
# one per call in the git-ignored .gpu/; each call moves its piece to /tmp/q, and once all are there
# they are joined into $CHELSEA_CACHE_DIR. A tokenizer folder packed as .gpu/tok.tgz is unpacked to
# /tmp/tok (presets have none). gguf is installed once from .whl (`pip download --no-deps gguf -d .whl`).
# Returns 1 (sourced) while model pieces are missing; the environment is set up either way.
mkdir -p /tmp/q
mv .gpu/qwen.part* /tmp/q/ 2>/dev/null
if [ -f .gpu/tok.tgz ]; then mkdir -p /tmp/tok && tar xzf .gpu/tok.tgz -C /tmp/tok --strip-components 1; fi
export CHELSEA_CACHE_DIR=/tmp/chelsea-cache PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
target=$CHELSEA_CACHE_DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
if [ ! -f "$target" ]; then
  if [ "$(ls /tmp/q | wc -l)" -lt "${PARTS:-13}" ]; then echo "model pieces here: $(ls /tmp/q | wc -l) of ${PARTS:-13}"; return 1 2>/dev/null || exit 1; fi
  mkdir -p $CHELSEA_CACHE_DIR && cat $(ls /tmp/q/qwen.part* | sort -V) > "$target" && rm -rf /tmp/q
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
