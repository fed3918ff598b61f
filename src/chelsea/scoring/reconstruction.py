"""Context reconstruction (KVzip's idea, arXiv 2505.23416): score every entry by what the model
reads to repeat its context.

After the context, the model is asked to repeat it ("Repeat the previous context exactly,
starting from: <last words of the previous chunk>", then the chunk itself as the reply), chunk by
chunk. An entry's score is the largest attention it receives from any repeating query of any
query head that reads its KV head, softmax taken over the attention sinks, the chunk being
repeated and the repeat itself. Entries the model must read to reproduce the text (a code's
digits) score high, whatever the question will be. With ``output_norm`` (the default) each query
head's attention is first multiplied by ``||W_h v||``, the norm of what the entry's value adds to
that head's output through the output projection (the factor KVzip+ multiplies in), over its mean
in the layer.

:func:`score_by_reconstruction` runs the repeat forwards through the model with the layers'
observers swapped for :class:`Reconstruction` (which computes the repeat's attention and raises
the scores), then removes the repeated tokens again, so the cache holds exactly the context.
``view="full"`` lets the repeating queries attend to the whole cache (as kvpress's KVzipPress
does; about two prefills of extra work); ``view="local"`` (the default, our cheaper variant) lets
them attend only to the sinks and the chunk they repeat, so the forward costs a linear number of
attention reads and several chunks repeat side by side in one forward. With a ``depth`` the
repeat stops after that many layers: the first layer past it ends the forward
(:class:`_StopRepeat` raises :class:`_RepeatDone`), so the deeper layers cost nothing.

On CUDA the local view's repeat takes each query's log-normaliser from the flash kernel that
computes its attention output (:func:`chelsea.attention.causal_attention_with_normaliser`), so the
scoring kernel makes one pass over the keys instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import causal_attention_with_normaliser, weighted_attention
from ..cache import ScoreObserver
from ..compat import cache_arg
from ..errors import ChelseaError
from ..haystack import chat_frame
from ..kernels import largest_attention_applies, largest_attention_kernel
from .attention_scores import logit_blocks

REPEAT_PROMPT = "\n\nRepeat the previous context exactly, starting from:"
VIEWS = ("local", "full")


@dataclass
class Reconstruction(ScoreObserver):
    """One repeat forward's scoring state for every layer: the context holds ``context`` entries;
    the chunk being repeated is entries ``[lo, hi)``; the first ``sinks`` entries are always visible."""

    context: int
    lo: int
    hi: int
    sinks: int
    view: str = "local"
    max_block_bytes: int = 1 << 30
    output_gram: torch.Tensor | None = None  # [kv_heads, groups, d, d]: W_o's block of each query head, W^T W
    score: bool = True  # False: the layer only attends (its hidden states feed the deeper layers)

    def attend(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, log_counts, scale, module=None):
        """The repeat tokens' attention output; raises the layer's scores ``[batch, kv_heads, context]``
        to the largest attention each chunk entry (and sink) receives (unless ``score`` is off)."""
        sinks = min(self.sinks, self.lo)
        if sinks == self.lo and self.hi == self.context:  # every stored entry is visible (a batched local repeat)
            old, visible, k, bias = slice(0, self.context), None, key, log_counts
        else:
            # Made on the device: copying an index from host memory would wait for the GPU in every layer.
            old = torch.cat([torch.arange(sinks, device=key.device), torch.arange(self.lo, self.hi, device=key.device)])
            visible = torch.cat([old, torch.arange(self.context, key.shape[2], device=key.device)])
            bias = None if log_counts is None else log_counts.index_select(-1, visible)
            k = key.index_select(2, visible)
        if not self.score:
            if self.view == "full":
                return weighted_attention(query, key, value, log_counts, scale=scale)
            return weighted_attention(query, k, value if visible is None else value.index_select(2, visible), bias, scale=scale)
        scored = sinks + self.hi - self.lo
        weight = None
        if self.output_gram is not None:
            v = value.index_select(2, old) if visible is not None else value[:, :, :scored]
            weight = output_weight(v, self.output_gram)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        log_weight = None if weight is None else weight.log()
        v = None if self.view == "full" else value if visible is None else value.index_select(2, visible)
        # The local view's output attends to exactly the keys the scores are over, so the attention
        # kernel's log-normaliser is the scores' too (on CUDA; elsewhere the scores compute their own).
        got = causal_attention_with_normaliser(query, k, v, scale=scale) if v is not None and bias is None else None
        best = largest_attention(query, k, bias, scored, scale, self.max_block_bytes, log_weight=log_weight,
                                 lse=None if got is None else got[1])
        scores = layer.scores
        scores[:, :, old] = torch.maximum(scores[:, :, old], best)
        if got is not None:
            return got[0]
        if self.view == "full":
            return weighted_attention(query, key, value, log_counts, scale=scale)
        return weighted_attention(query, k, v, bias, scale=scale)


class _RepeatDone(Exception):
    """Raised by the first layer past the repeat's depth: the rest of that forward is not needed."""


class _StopRepeat(ScoreObserver):
    """A layer's observer past the repeat's depth: its attention ends the forward."""

    def attend(self, *args, **kwargs):
        raise _RepeatDone




def output_gram(attention: torch.nn.Module, kv_heads: int) -> torch.Tensor:
    """``[kv_heads, groups, d, d]``: for each query head ``h``, ``W_h^T W_h`` where ``W_h`` is the
    block of the attention's output projection (``o_proj``) that head ``h``'s output passes
    through, so ``||W_h v||`` is ``sqrt(v^T G_h v)``."""
    proj, dim = getattr(attention, "o_proj", None), getattr(attention, "head_dim", None)
    if not isinstance(proj, torch.nn.Linear) or not isinstance(dim, int):
        raise ChelseaError(f"output_norm scoring needs an attention module with an o_proj linear layer and a head_dim; "
                           f"{type(attention).__name__} has not both (pass --no-output-norm)")
    weight = proj.weight
    weight = (weight.to_local() if hasattr(weight, "to_local") else weight).float()  # [hidden, heads * d]; this rank's heads under tensor parallelism
    heads = weight.shape[1] // dim
    blocks = weight.view(weight.shape[0], heads, dim).transpose(0, 1)  # [heads, hidden, d]
    return (blocks.transpose(1, 2) @ blocks).view(kv_heads, heads // kv_heads, dim, dim)


def output_weight(values: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``[batch, kv_heads, groups, n]``: ``||W_h v||`` of every value ``[batch, kv_heads, n, d]``
    for each query head reading it, divided by its mean over the ``n`` entries."""
    v = values.float()
    projected = torch.matmul(v[:, :, None], gram.to(v.device)[None])  # [batch, kv_heads, groups, n, d]: one batched matmul
    norms = (projected * v[:, :, None]).sum(-1).clamp_min(0).sqrt()
    return norms / norms.mean(-1, keepdim=True).clamp_min(1e-12)


def output_grams(model, cache, depth: int | None = None) -> list[torch.Tensor | None]:
    """:func:`output_gram` of every layer of ``model`` that ``cache`` holds (``None`` where empty
    or from layer ``depth`` on), each from the attention module with that ``layer_idx`` (the index
    it passes the cache)."""
    attentions = {m.layer_idx: m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "o_proj")}
    grams = []
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized or (depth is not None and i >= depth):
            grams.append(None)
            continue
        if i not in attentions:
            raise ChelseaError(f"output_norm scoring found no attention module with an o_proj for cache layer {i} (pass --no-output-norm)")
        grams.append(output_gram(attentions[i], layer.keys.shape[1]))
    return grams


def largest_attention(query, key, bias, old: int, scale: float, max_block_bytes: int = 1 << 30,
                      log_weight: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """The largest softmax attention each of the first ``old`` keys receives from any query of
    any query head that reads its KV head, ``[batch, kv_heads, old]`` float32.

    ``key`` ``[batch, kv_heads, old + m, d]`` holds those ``old`` entries, all visible, then the
    ``m`` queries' own entries, seen causally; ``bias`` ``[batch, kv_heads | 1, old + m]`` is added to the logits.
    Computed as log-probabilities, a block of queries at a time: the maximum of a probability is
    the exponential of the maximum of its logarithm, so no probability tensor is made and nothing
    is multiplied by the values here (the output comes from the attention kernel). On CUDA the
    Triton kernels of :mod:`chelsea.kernels.largest_attention` compute the same without the logits
    tensor. ``log_weight`` ``[batch, kv_heads, groups, old]``: each query head's attention to
    an entry is multiplied by its exponential before the maximum (``output_norm``). ``lse``
    ``[batch, heads, m]``: each query's log-normaliser, when the attention kernel gave it (the
    Triton path then skips its own pass; the PyTorch path computes it anyway).
    """
    if largest_attention_applies(query, key):
        return largest_attention_kernel(query, key, bias, old, scale, log_weight=log_weight, lse=lse)
    return _largest_attention_torch(query, key, bias, old, scale, max_block_bytes, log_weight)


def _largest_attention_torch(query, key, bias, old: int, scale: float, max_block_bytes: int = 1 << 30,
                             log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`largest_attention` in PyTorch (the CPU path)."""
    best = torch.full((*key.shape[:2], old), float("-inf"), dtype=torch.float32, device=key.device)
    extra = None if log_weight is None else log_weight.float()[:, :, :, None, :]
    for _, _, logits in logit_blocks(query, key, bias, scale=scale, max_block_bytes=max_block_bytes):
        lse = logits.logsumexp(-1, keepdim=True)
        part = logits[..., :old].sub_(lse)
        if extra is not None:
            part += extra
        best = torch.maximum(best, part.amax(dim=(2, 3)))
    return best.exp()


def repeat_prompts(tokenizer, context_ids: torch.Tensor, chunk_size: int, overlap: int = 8) -> list[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, ids)`` per chunk: the instruction to repeat, the last ``overlap`` tokens before
    the chunk (where it starts), the chat template's start of a reply, then the chunk."""
    device = context_ids.device
    ask = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    reply_start = chat_frame(tokenizer)[1] or "\n"  # the template's end of a user turn and start of a reply
    reply = tokenizer(reply_start, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    rows, n = context_ids.shape
    out = []
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        parts = [ask.expand(rows, -1), context_ids[:, max(0, lo - overlap) : lo], reply.expand(rows, -1), context_ids[:, lo:hi]]
        out.append((lo, hi, torch.cat(parts, dim=1)))
    return out


def score_by_reconstruction(model, cache, context_ids: torch.Tensor, tokenizer, *, chunk_size: int = 2048,
                            view: str = "local", keep_scores: bool = False, batch_tokens: int = 16384,
                            depth: int | None = None, scored: frozenset[int] | None = None) -> None:
    """Fill the importance scores of ``cache`` (prefilled with exactly ``context_ids`` and not yet
    compressed) by asking the model to repeat the context, chunk by chunk; see the module doc.
    ``keep_scores``: raise the scores the prefill left (the question's attention) instead of
    starting from 0, so an entry keeps the larger of the two.

    The local view repeats several chunks in one forward, side by side as batch rows of a cache
    that holds only the sinks and each row's chunk (:meth:`ClusteredCache.holding`), up to
    ``batch_tokens`` repeat tokens per forward: the same scores in fewer, fuller forwards (a
    forward of a small model over one 2K chunk waits on the host). The full view repeats one
    chunk at a time over the whole cache. ``depth``: the repeat runs through the first ``depth``
    layers of ``cache`` only (its forwards stop there); the deeper layers keep the scores they
    had. ``scored``: the indices of the layers whose scores the repeat writes (by default all of
    the first ``depth``); the others only attend and keep their scores.

    Afterwards the cache holds the context's entries again, nothing of the repeats."""
    if view not in VIEWS:
        raise ChelseaError(f"the reconstruction view must be one of {', '.join(VIEWS)}; got {view!r}")
    if chunk_size < 16:
        raise ChelseaError(f"the reconstruction chunk size must be at least 16 tokens; got {chunk_size}")
    if cache.method.scores != "importance":
        raise ChelseaError("context reconstruction scores a ClusteredCache whose method ranks by importance (kvzip, chelsea)")
    layers = [layer for layer in cache.layers if layer.is_initialized]
    n = context_ids.shape[1]
    if any(layer.has_padding for layer in layers):
        raise ChelseaError("context reconstruction does not take padded batches yet: compress prompts of different lengths one by one")
    if any(layer.length != n or layer.seen != n for layer in layers):
        raise ChelseaError("score the cache right after prefilling the context, before it is compressed")
    depth = len(cache.layers) if depth is None else depth
    if not isinstance(depth, int) or not 1 <= depth <= len(cache.layers):
        raise ChelseaError(f"the repeat's depth must be between 1 and the cache's {len(cache.layers)} layers; got {depth!r}")
    scored = frozenset(range(depth)) if scored is None else frozenset(i for i in scored if i < depth)
    if not keep_scores:
        for i in scored:
            if cache.layers[i].is_initialized:
                cache.layers[i].scores.zero_()
    sinks = cache.config.sink_tokens
    prompts = repeat_prompts(tokenizer, context_ids, chunk_size)
    grams = output_grams(model, cache, depth) if cache.method.scoring.output_norm else [None] * len(cache.layers)
    grams = [gram if i in scored else None for i, gram in enumerate(grams)]
    with torch.no_grad():  # not inference_mode: buffers grown here must stay writable afterwards
        if view == "local":
            for part in _side_by_side(prompts, context_ids.shape[0], sinks, batch_tokens):
                _repeat_side_by_side(model, cache, part, n, sinks, grams, depth, scored)
            return
        saved = [layer.observer for layer in cache.layers]
        for lo, hi, ids in prompts:
            for i, (layer, gram) in enumerate(zip(cache.layers, grams)):
                if layer.is_initialized:
                    layer.observer = (Reconstruction(n, lo, hi, sinks, view, output_gram=gram, score=i in scored)
                                      if i < depth else _StopRepeat())
            try:
                model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
            except _RepeatDone:
                pass
            finally:
                for layer, observer in zip(cache.layers, saved):
                    layer.observer = observer
                for layer in layers:
                    layer.length = layer.seen = n
                    layer.since_compression = n


def _side_by_side(prompts, rows: int, sinks: int, batch_tokens: int):
    """The repeat prompts in groups that can run as one forward: same sinks, chunk and prompt
    lengths, at most ``batch_tokens`` tokens (at least one prompt) per group."""
    groups: dict[tuple[int, int, int], list] = {}
    for lo, hi, ids in prompts:
        groups.setdefault((min(sinks, lo), hi - lo, ids.shape[1]), []).append((lo, hi, ids))
    for (_, _, length), members in groups.items():
        per = max(1, batch_tokens // (rows * length))
        for start in range(0, len(members), per):
            yield members[start : start + per]


def _repeat_side_by_side(model, cache, part, n: int, sinks: int, grams: list, depth: int, scored: frozenset[int]) -> None:
    """One forward repeating the chunks of ``part`` (``(lo, hi, ids)`` of equal shapes), each row
    over the sinks and its own chunk at the positions the repeat has after the context, through
    the first ``depth`` layers; the scores of the ``scored`` layers go back to ``cache``'s entries
    (a sink keeps its largest score over the chunks)."""
    sinks = min(sinks, part[0][0])
    width, rows, chunks = part[0][1] - part[0][0], part[0][2].shape[0], len(part)
    lo0, device = part[0][0], part[0][2].device
    if [lo for lo, _, _ in part] != list(range(lo0, lo0 + chunks * width, width)):  # as _side_by_side groups them
        raise AssertionError("side-by-side repeats take consecutive chunks of one width")
    # Made on the device: copying an index from host memory would wait for the GPU.
    index = torch.cat([torch.arange(sinks, device=device).expand(chunks, sinks),
                       lo0 + torch.arange(chunks * width, device=device).view(chunks, width)], dim=1).flatten()

    def visible(t):  # [rows, kv, n, d] -> [chunks * rows, kv, sinks + width, d], chunk-major
        picked = t.index_select(2, index).view(rows, t.shape[1], chunks, sinks + width, t.shape[3])
        return picked.permute(2, 0, 1, 3, 4).reshape(chunks * rows, t.shape[1], sinks + width, t.shape[3])

    entries = [(visible(layer.keys), visible(layer.values)) if layer.is_initialized and i < depth else None
               for i, layer in enumerate(cache.layers)]
    ids = torch.cat([ids for _, _, ids in part])
    side = cache.holding(entries, room=ids.shape[1])
    for i, (layer, gram) in enumerate(zip(side.layers, grams)):
        layer.observer = (Reconstruction(sinks + width, sinks, sinks + width, sinks, "local", output_gram=gram, score=i in scored)
                          if i < depth else _StopRepeat())
    positions = torch.arange(n, n + ids.shape[1], device=ids.device)[None]
    with side.held():
        try:
            model(input_ids=ids, position_ids=positions, **cache_arg(model, side), use_cache=True, logits_to_keep=1)
        except _RepeatDone:
            pass
    for i, (layer, mine) in enumerate(zip(cache.layers, side.layers)):
        if i not in scored or not layer.is_initialized:
            continue
        got = mine.scores[:, :, : sinks + width].view(chunks, rows, layer.scores.shape[1], sinks + width)
        if sinks:
            layer.scores[:, :, :sinks] = torch.maximum(layer.scores[:, :, :sinks], got[..., :sinks].amax(0))
        span = layer.scores[:, :, lo0 : lo0 + chunks * width]  # [rows, kv, chunks * width]: one maximum over every chunk
        span.copy_(torch.maximum(span, got[..., sinks:].permute(1, 2, 0, 3).reshape(span.shape)))

