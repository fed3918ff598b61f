"""The knobs of KV-cache compression, checked once so every entry point reports bad values alike."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import ChelseaError


@dataclass(frozen=True)
class CompressionConfig:
    """How much to compress and what to protect.

    Attributes:
        ratio: fraction of the KV cache removed, in [0, 1). 0.8 keeps 20% of the entries. The budget
            of a sequence that has seen ``n`` tokens is ``ceil((1 - ratio) * n)`` entries per layer and
            KV head (never below ``sink_tokens + window``, which are always kept).
        chunk_size: ``chelsea-paper``: consecutive entries searched together for matches (C in the paper). Larger
            chunks find better matches at O(C) more work per entry. At least 2.
        sink_tokens: first tokens of the sequence that are never merged (attention sinks).
        window: most recent tokens that are never merged; also keeps a question at the end of a
            prompt exact.
        step_fraction: the largest share of set A (about half the region) one merge step may
            merge; steps repeat on the shrunk sequence until the budget is met. Merging everything
            in one step pairs up dissimilar neighbours (a pass key's digits, say); 0.5 keeps only
            the most similar half of the edges per step. In (0, 1].
        compress_every: during decoding, cluster again once this many new tokens have arrived
            since the last clustering. Between clusterings the cache holds at most this many
            entries above budget. The default equals ``chunk_size``.
        decode_span: ``chelsea`` and ``chelsea-paper``. During decoding, re-cluster only the last
            ``decode_span`` entries before the window, where the new tokens are, instead of the
            whole cache; the work per clustering then no longer grows with the context. ``None``
            re-clusters the whole cache every time, like after a prefill. Eviction methods always
            rank the whole cache.
        exact_share: ``chelsea`` only. The share of the kept entries, ranked by importance over all
            KV heads of a layer, that stay exact (never merged into or away); the other kept
            entries absorb the entries that are not kept. 1.0 is eviction by importance.
        min_similarity: ``chelsea`` only. An entry whose key's best cosine similarity to a
            representative is below this is dropped rather than merged.
        merge: ``chelsea`` only. ``"centroid"``: a representative becomes the count-weighted
            centroid of its members' keys and values; ``"values"``: it keeps its key and
            averages only the values.
        neighbourhood: ``chelsea`` only. Entries look for a representative among this many
            consecutive region entries (a block).
        importance: ``kvzip`` and ``chelsea``: where their scores come from when the context is
            compressed with :func:`chelsea.importance.compress_context` (what ``chelsea eval``
            and ``chelsea generate`` do): ``"local"`` (default) context reconstruction whose
            repeat attends to the sinks and the chunk it repeats, ``"full"`` reconstruction whose
            repeat attends to the whole cache, ``"window"`` the prompt's last queries only,
            ``"surprise"`` each token's surprisal only (no extra forward at all).
            A plain ``model.generate`` always uses the last queries.
        surprise_weight: ``chelsea`` only. Weight of each token's surprisal (capped at 1 from 10
            nats on) added to its reconstruction or window score in every layer and head.
        layer_floor: ``kvzip`` and ``chelsea``. Layers get uneven budgets from the importance
            scores of all layers ranked together; none gets less than this fraction of an even
            split of the budget beyond sinks and window.
        output_norm: ``kvzip`` and ``chelsea``, reconstruction scores only. Weight the attention
            an entry receives from each query head by the norm of what its value adds to that
            head's output, ``||W_o v||`` (the factor KVzip+ multiplies in), divided by the mean of
            that norm over the layer's scored entries so scores keep the scale of probabilities.
            On by default (it raised both methods' scores in every measured cell but one);
            off is the paper's KVzip scoring, what kvpress's ``KVzipPress`` does by default.
        fact_weight: ``chelsea`` only, reconstruction scores only. After the layer budgets are
            split, every layer ranks its entries by its own percentile plus this weight times the
            token's mean percentile over the model's fact heads (:mod:`chelsea.fact_heads`, found
            once per model by a calibration on planted codes). The default 100 ranks by the fact
            heads first and by the layer's own scores among equals (at 2K tokens and 80% removed
            it scored 88 / 87 against 83 / 84 for weight 3 and 68 / 67 without); 0 turns it off.
        fact_heads: ``chelsea``: how many (layer, KV head) pairs the calibration chooses.
        repeat_depth: ``chelsea`` with fact heads, reconstruction scores only. ``"facts"``
            (default): the repeat stops after the deepest fact head's layer (the rest of its
            forward is not run); the deeper layers keep the prefill's last-query scores, take an
            even share of the budget and rank by the fact heads like every layer. For
            Qwen2.5-Coder-0.5B (fact heads down to layer 16 of 24) that took the prefill at 32K
            from 3.85x to 3.24x the plain one, with the same scores at 80% removed and higher ones
            at 90% (``results/issue14``). ``"all"``: the repeat runs through every layer.
        fact_layers: ``chelsea``: the calibration chooses fact heads only among the first this
            many layers (``None``: any layer). With ``repeat_depth="facts"`` the repeat then runs
            through at most that many layers: fewer layers, a cheaper prefill.
        repeat_chunk: ``kvzip`` and ``chelsea``, reconstruction scores only. Tokens of context
            repeated per chunk: with the local view each repeating query attends to the sinks,
            its chunk and the repeat, so the attention work grows with the chunk.
        score_layers: ``chelsea`` with fact heads, reconstruction scores only. ``"all"``
            (default): every layer the repeat runs through takes its scores from it.
            ``"facts"``: only the layers that hold a fact head do (the others still run, their
            hidden states feed the deeper layers, but skip the scoring kernel); the rest keep the
            prefill's last-query scores, take an even share of the budget and rank by the fact
            heads like every layer.
        layer_budgets: ``chelsea`` with fact heads, reconstruction scores only. ``"scores"``
            (default): the budget is split over layers by this context's scores (every entry of
            every layer ranked together). ``"calibrated"``: by the score distributions of each
            layer measured once, with the fact heads, on the calibration prompts; then only the
            fact heads' layers are scored by the repeat (the others' own scores would only
            break ties in the fact heads' ranking) and no surprisal is computed (it would only
            move the budgets).
    """

    ratio: float = 0.5
    chunk_size: int = 32
    sink_tokens: int = 4
    window: int = 64
    step_fraction: float = 0.5
    compress_every: int | None = None
    decode_span: int | None = 256
    exact_share: float = 0.5
    min_similarity: float = 0.0
    merge: str = "centroid"
    neighbourhood: int = 128
    layer_floor: float = 0.2
    importance: str = "local"
    surprise_weight: float = 0.3
    output_norm: bool = True
    fact_weight: float = 100.0
    fact_heads: int = 12
    repeat_depth: str = "facts"
    fact_layers: int | None = None
    repeat_chunk: int = 2048
    score_layers: str = "all"
    layer_budgets: str = "scores"

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
            raise ChelseaError(
                f"ratio must be in [0, 1): the fraction of the KV cache removed (0.8 keeps 20%); got {self.ratio!r}"
            )
        if not isinstance(self.chunk_size, int) or self.chunk_size < 2:
            raise ChelseaError(f"chunk_size must be an integer >= 2; got {self.chunk_size!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ChelseaError(f"sink_tokens must be an integer >= 0; got {self.sink_tokens!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ChelseaError(f"window must be an integer >= 0; got {self.window!r}")
        if not isinstance(self.step_fraction, (int, float)) or not 0.0 < float(self.step_fraction) <= 1.0:
            raise ChelseaError(f"step_fraction must be in (0, 1]; got {self.step_fraction!r}")
        if self.compress_every is None:
            object.__setattr__(self, "compress_every", self.chunk_size)
        elif not isinstance(self.compress_every, int) or self.compress_every < 1:
            raise ChelseaError(f"compress_every must be an integer >= 1; got {self.compress_every!r}")
        if self.decode_span is not None and (not isinstance(self.decode_span, int) or self.decode_span < 2):
            raise ChelseaError(f"decode_span must be an integer >= 2 (entries) or None (the whole cache); got {self.decode_span!r}")
        for name in ("exact_share", "layer_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ChelseaError(f"{name} must be in [0, 1]; got {value!r}")
        if not isinstance(self.min_similarity, (int, float)) or not -1.0 <= float(self.min_similarity) <= 1.0:
            raise ChelseaError(f"min_similarity must be a cosine similarity in [-1, 1]; got {self.min_similarity!r}")
        if self.importance not in ("local", "full", "window", "surprise"):
            raise ChelseaError(f"importance must be 'local', 'full', 'window' or 'surprise'; got {self.importance!r}")
        if not isinstance(self.surprise_weight, (int, float)) or self.surprise_weight < 0:
            raise ChelseaError(f"surprise_weight must be a number >= 0; got {self.surprise_weight!r}")
        if not isinstance(self.fact_weight, (int, float)) or self.fact_weight < 0:
            raise ChelseaError(f"fact_weight must be a number >= 0; got {self.fact_weight!r}")
        if not isinstance(self.fact_heads, int) or self.fact_heads < 1:
            raise ChelseaError(f"fact_heads must be an integer >= 1; got {self.fact_heads!r}")
        if self.repeat_depth not in ("all", "facts"):
            raise ChelseaError(f"repeat_depth must be 'all' or 'facts' (stop after the deepest fact head); got {self.repeat_depth!r}")
        if self.score_layers not in ("all", "facts"):
            raise ChelseaError(f"score_layers must be 'all' or 'facts' (only the fact heads' layers score the repeat); got {self.score_layers!r}")
        if self.layer_budgets not in ("scores", "calibrated"):
            raise ChelseaError(f"layer_budgets must be 'scores' (from this context) or 'calibrated' (from the fact-head calibration); got {self.layer_budgets!r}")
        if self.layer_budgets == "calibrated" and not self.fact_weight:
            raise ChelseaError("layer_budgets='calibrated' comes from the fact-head calibration: it needs fact_weight > 0")
        if self.fact_layers is not None and (not isinstance(self.fact_layers, int) or self.fact_layers < 1):
            raise ChelseaError(f"fact_layers must be an integer >= 1 (the first layers fact heads are chosen from) or None; got {self.fact_layers!r}")
        if not isinstance(self.repeat_chunk, int) or self.repeat_chunk < 16:
            raise ChelseaError(f"repeat_chunk must be an integer >= 16 (tokens repeated per chunk); got {self.repeat_chunk!r}")
        if self.output_norm not in (True, False):
            raise ChelseaError(f"output_norm must be true or false; got {self.output_norm!r}")
        object.__setattr__(self, "output_norm", bool(self.output_norm))
        if self.merge not in ("centroid", "values"):
            raise ChelseaError(f"merge must be 'centroid' or 'values'; got {self.merge!r}")
        if not isinstance(self.neighbourhood, int) or self.neighbourhood < 2:
            raise ChelseaError(f"neighbourhood must be an integer >= 2 (entries); got {self.neighbourhood!r}")

    def guided_options(self) -> dict:
        """The settings the importance-ranked methods take besides the shared ones."""
        return {"exact_share": self.exact_share, "min_similarity": self.min_similarity, "merge": self.merge,
                "neighbourhood": self.neighbourhood}

    def budget(self, tokens: int) -> int:
        """Entries to keep for a sequence of ``tokens`` tokens."""
        keep = math.ceil(round((1.0 - self.ratio) * tokens, 6))  # round first: 0.3 * 10 is 3.0000000000000004
        return min(tokens, max(keep, self.sink_tokens + self.window))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClusterGenConfig:
    """Settings of ClusterGen (online key clustering + value sampling, see methods/clustergen.py).

    Attributes:
        delta: cluster radius, relative to the median key norm of the layer's first summarised
            block (keys' scale differs a lot between layers). A key joins the nearest cluster whose
            centre is within ``delta * median norm``, else it opens a new one. 0 puts only identical
            keys together. On SmolLM2-135M keys, 0.5 opened about one cluster per two tokens (a
            summary larger than the full cache); 1.0 kept 35-44% of the full cache's bytes at 1K-4K
            tokens (benchmarks/clustergen_error.py).
        cluster_samples: member keys kept per cluster (uniform sample) for the softmax denominator.
        value_samples: (key, value) pairs kept, sampled by squared value norm, for the numerator
            (``numerator="values"`` only).
        numerator: ``"clusters"`` (default): the sampled members keep their values and the
            numerator is estimated from them, like the denominator; ``"values"``: the paper's
            separate value-norm sample. On Qwen2.5-Coder-0.5B's keys, values and queries at
            1K-4K tokens the mean relative attention error was 0.31-0.69 with the members and
            213-39,231 with the value sample (results/issue4/numerators); the members' output
            stays inside the values' hull.
        sink_tokens, window: first and most recent tokens kept exactly.
        compress_every: while decoding, move tokens that left the window into the summary once
            this many have piled up.
        radius: what ``delta`` is relative to: ``"norm"`` (default), the median key norm of the
            first summarised block; ``"spread"``, the median distance of those keys from their
            mean. Keys that share a large common offset (Qwen2.5's first layer) all fit in one
            norm-relative cluster; the spread measures how far apart they really are.
    """

    delta: float = 1.0
    cluster_samples: int = 4
    value_samples: int = 256
    sink_tokens: int = 4
    window: int = 64
    compress_every: int = 32
    numerator: str = "clusters"
    radius: str = "norm"

    def __post_init__(self) -> None:
        if self.radius not in ("norm", "spread"):
            raise ChelseaError(f"radius must be 'norm' or 'spread'; got {self.radius!r}")
        if self.numerator not in ("clusters", "values"):
            raise ChelseaError(f"numerator must be 'clusters' or 'values'; got {self.numerator!r}")
        if not isinstance(self.delta, (int, float)) or self.delta < 0:
            raise ChelseaError(f"delta must be a number >= 0 (relative to the median key norm); got {self.delta!r}")
        for name in ("cluster_samples", "value_samples", "compress_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ChelseaError(f"{name} must be an integer >= 1; got {value!r}")
        for name in ("sink_tokens", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ChelseaError(f"{name} must be an integer >= 0; got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)
