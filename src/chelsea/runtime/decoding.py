"""Greedy decoding with the cache pinned in place, replayed from a CUDA graph on the GPU.

One decoding step of an 8B model launches hundreds of small kernels from Python; at small batches
that host work, not reading weights and cache, sets the speed. :class:`GraphDecoder` records one
step into a CUDA graph and replays it. For that the step must not depend on anything the host
changes between steps, so the cache layers are *pinned* (:meth:`chelsea.cache.ClusteredLayer.pin`):

- every layer's buffers are fixed at ``length + headroom`` entries; entries past the filled part
  carry log-count ``-inf``, and attention runs over the whole buffer;
- the write position of each layer and the token position live in one device tensor, ``state``,
  which the recorded step itself advances by one;
- after each replay the host updates its own counters (``advance``) and, every
  ``compress_every`` tokens, clusters the layers eagerly, in place, outside the graph, all due
  layers in one batch where their shapes agree (:func:`chelsea.cache.compress_together`).

When a layer fills its headroom the buffers are re-pinned larger and the step recorded again.
With ``cuda_graph=False`` (always on the CPU) the same pinned step runs eagerly, which is how the
CPU tests check the pinned path against ordinary decoding.

:class:`RowStep` is the same for a server's running batch (``chelsea serve --cuda-graph``): each
row at its own position, tokens chosen on the host, recorded again whenever rows join or leave.

What remains of a replayed step is mostly the weights' matrix products, the attention kernel and
many tiny element-wise kernels; :func:`fuse_layers` compiles the decoder layers so the latter fuse.
"""

from __future__ import annotations

import torch

from ..cache import ClusteredCache, ClusteredLayer
from ..compat import cache_arg
from ..errors import ChelseaError
from ..host import on_device


def fuse_layers(model) -> int:
    """Compile each decoder layer of ``model`` with ``torch.compile``; returns how many.

    A decoding step at small batch is mostly tiny element-wise kernels around the matrix products:
    RMS norms, rotary embeddings, the MLP's activation, residual additions, each a launch and a
    round trip through memory. Compiled, they fuse into a few kernels per layer. The cache update
    and the "chelsea" attention stay outside the compiled graphs (they cluster on the host), so
    the layer is compiled in pieces around them.

    Every new input shape compiles once (seconds); a step replayed from a CUDA graph
    (:class:`GraphDecoder`) then runs the fused kernels. To keep a prefill eager, run it under
    ``torch.compiler.set_stance("force_eager")``.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ChelseaError(f"{type(model).__name__} has no list of decoder layers to compile")
    # Each layer's attention passes its own layer index to the cache, so every layer can need
    # its own graphs; the default limit (8 per function) would leave the rest eager.
    limit = 4 * len(layers) + 8
    settings = torch._dynamo.config
    for names, value in ((("recompile_limit", "cache_size_limit"), limit),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), 16 * limit)):
        name = next(n for n in names if hasattr(settings, n))  # renamed in PyTorch 2.6
        setattr(settings, name, max(getattr(settings, name), value))
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


class _Pinned:
    """What :class:`GraphDecoder` and :class:`RowStep` share: pinned ``layers`` and a
    :class:`Recorder` whose step the host then accounts for."""

    layers: list
    recorder: Recorder

    def _run(self, body) -> None:
        """Run (or replay) the step, then advance every layer's host-side counters by one token."""
        self.recorder.run(body)
        for layer in self.layers:
            layer.advance(1)

    def close(self) -> None:
        """Unpin the layers (the cache works with ordinary ``model`` calls, and rows may join or
        leave, again) and drop the graph."""
        for layer in self.layers:
            layer.unpin()
        self.recorder.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GraphDecoder(_Pinned):
    """Greedy decoding of a batch after its prefill, one token per call of :meth:`step`.

    Args:
        model: a causal LM prepared with :func:`chelsea.prepare_model` (``"chelsea"`` attention).
        cache: the :class:`ClusteredCache` the prefill filled; ``ClusteredCache(ratio=0.0)`` is a
            full cache in the same buffers.
        token: ``[batch, 1]`` (or ``[batch]``) the first new token, chosen from the prefill's logits.
        cuda_graph: record and replay the step (default: on CUDA devices).
        headroom: free entries per layer when pinning; a re-pin and a new recording follow once
            a layer fills them.
        warmup: eager steps before recording (Triton compiles, cuBLAS picks its kernels there).
    """

    def __init__(self, model, cache: ClusteredCache, token: torch.Tensor, *, cuda_graph: bool | None = None,
                 headroom: int = 256, warmup: int = 2):
        if not isinstance(cache, ClusteredCache) or not all(isinstance(layer, ClusteredLayer) for layer in cache.layers):
            raise ChelseaError("GraphDecoder needs a ClusteredCache whose method keeps its entries in clustered layers (not clustergen)")
        self.layers = list(cache.layers)
        if not self.layers or not all(layer.is_initialized for layer in self.layers):
            raise ChelseaError("run the prefill through the cache before decoding with GraphDecoder")
        if headroom < 1:
            raise ChelseaError(f"headroom must be at least 1 entry; got {headroom}")
        self.model, self.cache = model, cache
        self.device = token.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ChelseaError("cuda_graph=True needs the model on a CUDA device")
        self.headroom = headroom
        self.token = token.reshape(-1, 1).clone()
        self.state = torch.zeros(1 + len(self.layers), dtype=torch.long, device=self.device)
        self.recorder = Recorder(self.device, self.cuda_graph, warmup)
        self.logits: torch.Tensor | None = None  # [batch, 1, vocab] of the latest step
        self._pin()

    @property
    def recordings(self) -> int:
        return self.recorder.recordings

    def _pin(self) -> None:
        self.recorder.reset()
        pin_layers(self.layers, self.state[1:], self.headroom, exact=True)
        self.state[:1].fill_(self.layers[0].seen)

    def _body(self) -> None:
        """One step, all on the device: forward at position ``state[0]``, argmax, advance ``state``."""
        with torch.no_grad():
            self.logits = self.model(
                self.token, position_ids=self.state[:1].view(1, 1), **cache_arg(self.model, self.cache), use_cache=True, logits_to_keep=1
            ).logits
            self.token.copy_(self.logits[:, -1:].argmax(-1))
            self.state.add_(1)

    def step(self) -> torch.Tensor:
        """Decode one token for every row; returns the ``[batch, 1]`` token tensor (reused by the
        next step: clone it to keep it)."""
        if any(layer.length >= layer.capacity for layer in self.layers):
            self._pin()
        self._run(self._body)
        self.cache.compress_due()
        return self.token


class Recorder:
    """Runs a step: eagerly without CUDA graphs; else ``warmup`` eager runs on a side stream
    (Triton compiles, cuBLAS picks its kernels), then one recording, then replays until
    :meth:`reset` (the step's buffers moved). Recorded with ``thread_local`` capture errors, so
    another thread (a server's prefill) may use the GPU meanwhile."""

    def __init__(self, device: torch.device, cuda_graph: bool, warmup: int):
        self.device, self.cuda_graph, self.warmup = device, cuda_graph, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.recordings = 0
        self._warm = 0

    def reset(self) -> None:
        self.graph, self._warm = None, 0

    def run(self, body) -> None:
        if not self.cuda_graph:
            body()
        elif self.graph is None and self._warm < self.warmup:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                body()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._warm += 1
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    body()
                self.recordings += 1
            self.graph.replay()


def pin_layers(layers: list, slots: torch.Tensor, headroom: int, exact: bool = False) -> None:
    """Pin ``layers`` (layer ``i`` writing at ``slots[i]``) with ``headroom`` free entries each
    (unless ``exact``, a buffer with at least half that room free stays as it is: no copy).
    Padding that every row shares in front is freed first: pinned compressions leave it (their
    buffers must not move)."""
    for i, layer in enumerate(layers):
        if layer.pinned:
            layer.unpin()
            if layer.has_padding:
                layer._drop_leading_padding()
        room = layer.capacity - layer.length
        keep = not exact and room >= max(1, headroom // 2)
        layer.pin(layer.capacity if keep else layer.length + headroom, slots[i : i + 1])


class RowStep(_Pinned):
    """One decoding forward of a batch whose rows sit at their own positions (a server's running
    batch), with the cache pinned, replayed from a CUDA graph on the GPU.

    The rows' tokens and positions are copied into fixed device tensors before each step; each
    layer writes at its own device-side slot, which the recorded step advances. Rows joining or
    leaving move the buffers: :meth:`close` first, then a new ``RowStep`` (recorded again).
    After a step, the cache's ``compress_due`` compresses the due rows in place.
    """

    def __init__(self, model, cache: ClusteredCache, *, cuda_graph: bool | None = None, headroom: int = 64, warmup: int = 1):
        self.layers = list(cache.layers)
        if not self.layers or not all(isinstance(layer, ClusteredLayer) and layer.is_initialized for layer in self.layers):
            raise ChelseaError("RowStep needs a prefilled ClusteredCache whose method keeps its entries in clustered layers")
        self.model, self.cache = model, cache
        self.device = self.layers[0].device
        rows = self.layers[0].keys.shape[0]
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.slots = torch.zeros(len(self.layers), dtype=torch.long, device=self.device)
        self.headroom = headroom
        self.recorder = Recorder(self.device, self.device.type == "cuda" if cuda_graph is None else cuda_graph, warmup)
        self.logits: torch.Tensor | None = None
        pin_layers(self.layers, self.slots, headroom)

    def _body(self) -> None:
        self.logits = self.model(self.tokens, position_ids=self.positions, **cache_arg(self.model, self.cache), use_cache=True,
                                 logits_to_keep=1).logits
        self.slots.add_(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, 1, vocab]`` for ``tokens`` ``[rows, 1]`` (device), each row at its own
        next position; the returned tensor is overwritten by the next step."""
        if any(layer.length >= layer.capacity for layer in self.layers):
            self.recorder.reset()
            pin_layers(self.layers, self.slots, self.headroom)
        self.tokens.copy_(tokens)
        self.positions.copy_(on_device(self.cache.row_positions(), self.device)[:, None])
        self._run(self._body)
        return self.logits
