"""``clustergen``: a sublinear summary of the KV stream and the attention estimated from it.

Plain tensor code, no model inside; every tensor is batched over ``[batch, kv_heads]`` and each
(row, head) has its own summary. Attention is ``numerator / denominator`` with
``denominator = sum_j exp(s q.k_j)`` and ``numerator = sum_j exp(s q.k_j) v_j``; both sums are
estimated from the summary, and exact terms for a recent window (and sinks) are added by the caller.

Denominator: keys are clustered online. A key joins the nearest cluster whose centre (the key that
opened it) is within Euclidean distance ``delta``, else it opens a new cluster. Each cluster keeps
its count and a uniform sample, without replacement, of up to ``cluster_samples`` member keys
(bottom-k of i.i.d. uniform priorities, which streams). The estimate is
``sum_c count_c / |S_c| * sum_{k in S_c} exp(s q.k)``: unbiased, and exact when every cluster keeps
all its members.

Numerator: a sample of (key, value) pairs weighted by ``||v||^2``, drawn by priority sampling
(Duffield, Lund and Thorup 2007): priority ``w / u`` with ``u`` uniform, keep the ``value_samples``
largest, and let ``tau`` be the next largest priority seen. Each kept pair stands for
``max(w, tau) / w`` pairs. The estimate is unbiased for any query and exact when no more than
``value_samples`` pairs have been seen (then ``tau = 0``). This replaces the paper's i.i.d. draws,
which are never exact, with a sampler that streams, updates in bulk with one top-k, and is exact in
the limit.

Numerator, alternative (``numerator="clusters"``, not in the paper): each sampled cluster member
also keeps its value, and the numerator is estimated from the same stratified sample as the
denominator: ``sum_c count_c / |S_c| * sum_{k in S_c} exp(s q.k) v_k``. It is unbiased for the
numerator too, exact when every cluster keeps all its members, needs no value sample, and the
ratio of the two estimates is a convex combination of stored values, so the output cannot leave
their hull. On real keys the value sample's estimate often lands far outside it (the ratio of two
independent estimates), which is why this option exists (benchmarks/clustergen_error.py).

Bulk updates (prefill) are vectorised: keys first join existing clusters in one distance
computation; the keys left over open clusters greedily, one new cluster per head per iteration, so
the loop runs over new clusters, not tokens. Within one block, a key may join an existing cluster
even if a cluster opened later in the same block is nearer; every member is still within ``delta``
of its centre, which is what the error bound needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..settings import setting
from .base import Method, register


@dataclass
class ClusterGenSummary:
    """Summary of the keys and values seen by each (row, KV head).

    ``centers`` ``[B, H, M, D]`` and ``counts`` ``[B, H, M]`` of the (up to ``M``) clusters,
    ``n_clusters`` ``[B, H]`` in use; ``sample_keys`` ``[B, H, M, s, D]`` with their uniform
    priorities ``sample_prio`` (``inf`` marks an empty slot); the value sample ``value_keys``,
    ``values`` ``[B, H, t + 1, ...]`` with weights ``value_weight`` and priorities ``value_prio``
    (``-inf`` marks an empty slot; the last slot only holds the threshold ``tau``).
    """

    delta: float
    cluster_samples: int
    value_samples: int
    centers: torch.Tensor
    counts: torch.Tensor
    n_clusters: torch.Tensor
    sample_keys: torch.Tensor
    sample_prio: torch.Tensor
    value_keys: torch.Tensor
    values: torch.Tensor
    value_weight: torch.Tensor
    value_prio: torch.Tensor
    member_values: torch.Tensor | None = None
    generator: torch.Generator | None = None

    @classmethod
    def empty(
        cls,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        delta: float,
        cluster_samples: int = 4,
        value_samples: int = 64,
        numerator: str = "values",
        capacity: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> "ClusterGenSummary":
        if delta < 0:
            raise ValueError(f"delta must be >= 0; got {delta}")
        if cluster_samples < 1 or (value_samples < 1 and numerator == "values"):
            raise ValueError(f"cluster_samples and value_samples must be >= 1; got {cluster_samples}, {value_samples}")
        if numerator not in ("values", "clusters"):
            raise ValueError(f"numerator must be 'values' or 'clusters'; got {numerator!r}")
        value_dim = value_dim or head_dim
        z = dict(dtype=dtype, device=device)  # stored vectors
        w = dict(dtype=torch.promote_types(dtype, torch.float32), device=device)  # counts, priorities, weights
        if numerator == "clusters":
            value_samples = 0  # the members carry the values; no separate sample
        return cls(
            delta=float(delta),
            cluster_samples=cluster_samples,
            value_samples=value_samples,
            centers=torch.zeros(batch, heads, capacity, head_dim, **z),
            counts=torch.zeros(batch, heads, capacity, **w),
            n_clusters=torch.zeros(batch, heads, dtype=torch.long, device=device),
            sample_keys=torch.zeros(batch, heads, capacity, cluster_samples, head_dim, **z),
            sample_prio=torch.full((batch, heads, capacity, cluster_samples), float("inf"), **w),
            value_keys=torch.zeros(batch, heads, value_samples + 1, head_dim, **z),
            values=torch.zeros(batch, heads, value_samples + 1, value_dim, **z),
            value_weight=torch.zeros(batch, heads, value_samples + 1, **w),
            value_prio=torch.full((batch, heads, value_samples + 1), float("-inf"), **w),
            member_values=torch.zeros(batch, heads, capacity, cluster_samples, value_dim, **z) if numerator == "clusters" else None,
            generator=generator,
        )

    def map_rows(self, fn) -> None:
        """Replace every per-row tensor ``t`` by ``fn(t)`` (row selection for beam search, repeats)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, fn(value))

    # ------------------------------------------------------------------ updates

    def _rand(self, shape, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand(shape, generator=self.generator, dtype=like.dtype, device=like.device)
        return u.clamp_min(torch.finfo(like.dtype).tiny)

    def _grow(self, needed: int) -> None:
        capacity = self.centers.shape[2]
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity)

        def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
            shape = list(x.shape)
            shape[2] = new - capacity
            return torch.cat([x, x.new_full(shape, fill)], dim=2)

        self.centers, self.counts = pad(self.centers, 0.0), pad(self.counts, 0.0)
        self.sample_keys, self.sample_prio = pad(self.sample_keys, 0.0), pad(self.sample_prio, float("inf"))
        if self.member_values is not None:
            self.member_values = pad(self.member_values, 0.0)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add a block of tokens ``[B, H, n, D]`` (one token while decoding, many after prefill)."""
        keys, values = keys.to(self.counts.dtype), values.to(self.counts.dtype)
        cluster = self._assign(keys)
        self._sample_members(keys, values, cluster)
        if self.member_values is None:
            self._sample_values(keys, values)

    def _assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Cluster index ``[B, H, n]`` of every new key; opens clusters as needed."""
        batch, heads, n, _ = keys.shape
        cluster = torch.full((batch, heads, n), -1, dtype=torch.long, device=keys.device)
        capacity = self.centers.shape[2]
        if int(self.n_clusters.max()) > 0:
            dist = torch.cdist(keys, self.centers.to(keys.dtype))  # [B, H, n, M]
            active = torch.arange(capacity, device=keys.device) < self.n_clusters[..., None]
            dist = dist.masked_fill(~active[:, :, None, :], float("inf"))
            nearest, index = dist.min(dim=-1)
            cluster = torch.where(nearest <= self.delta, index, cluster)
        open_ = cluster < 0
        while bool(open_.any()):
            has = open_.any(dim=-1)  # [B, H]
            first = open_.int().argmax(dim=-1)  # first unassigned key per head
            center = torch.gather(keys, 2, first[..., None, None].expand(-1, -1, 1, keys.shape[-1]))
            claim = open_ & (torch.linalg.vector_norm(keys - center, dim=-1) <= self.delta) & has[..., None]
            claim.scatter_(2, first[..., None], has[..., None])  # the opener always claims itself
            slot = self.n_clusters.clone()
            self._grow(int(slot.max()) + 1)
            rows = has.nonzero(as_tuple=True)
            self.centers[rows + (slot[rows],)] = center[..., 0, :][rows]
            cluster = torch.where(claim, slot[..., None], cluster)
            self.n_clusters += has.long()
            open_ &= ~claim
        self.counts.scatter_add_(2, cluster, torch.ones_like(cluster, dtype=self.counts.dtype))
        return cluster

    def _sample_members(self, keys: torch.Tensor, values: torch.Tensor, cluster: torch.Tensor) -> None:
        """Keep, per cluster, the members with the ``s`` smallest uniform priorities (and their
        values, with ``numerator="clusters"``)."""
        prio = self._rand(cluster.shape, keys)
        self.sample_prio, keep = _bottom_members(self.sample_prio, cluster, prio)
        self.sample_keys = keep(self.sample_keys, keys)
        if self.member_values is not None:
            self.member_values = keep(self.member_values, values)

    def _sample_values(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Priority sampling by ``||v||^2``: keep the ``t + 1`` largest priorities ``w / u``."""
        weight = values.pow(2).sum(-1)
        prio = weight / self._rand(weight.shape, weight)
        cand_prio = torch.cat([self.value_prio, prio], dim=2)
        top = cand_prio.topk(self.value_samples + 1, dim=-1)
        idx = top.indices

        def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old, new.to(old.dtype)], dim=2)
            index = idx if both.dim() == 3 else idx[..., None].expand(-1, -1, -1, both.shape[-1])
            return torch.gather(both, 2, index)

        self.value_keys, self.values = pick(self.value_keys, keys), pick(self.values, values)
        self.value_weight, self.value_prio = pick(self.value_weight, weight), top.values

    # ------------------------------------------------------------------ accounting

    def tokens(self) -> torch.Tensor:
        """Tokens summarised per (row, head): the sum of the cluster counts."""
        return self.counts.sum(-1)

    def nbytes(self) -> int:
        """Bytes of the summary actually in use (clusters up to the largest count over heads)."""
        used = int(self.n_clusters.max()) if self.n_clusters.numel() else 0
        vectors = self.centers[0, 0, 0].numel() + self.sample_keys[0, 0, 0].numel()
        if self.member_values is not None:
            vectors += self.member_values[0, 0, 0].numel()
        scalars = 1 + self.sample_prio.shape[-1]  # count, member priorities
        per_cluster = vectors * self.centers.element_size() + scalars * self.counts.element_size()
        values = sum(t.numel() * t.element_size() for t in (self.value_keys, self.values, self.value_weight, self.value_prio))
        return self.centers.shape[0] * self.centers.shape[1] * used * per_cluster + values

    # ------------------------------------------------------------------ estimates

    def log_terms(self, query: torch.Tensor, scale: float):
        """Log-weighted logits of both estimators for ``query`` ``[B, H, r, D]`` (r query rows per KV head).

        Returns ``(denominator logits [B, H, r, M*s], numerator logits [B, H, r, t], numerator values [B, H, t, Dv])``
        where each logit already includes its estimator weight; empty slots are ``-inf``.
        """
        batch, heads, capacity, s, _ = self.sample_keys.shape
        q = query.to(self.counts.dtype)
        filled = torch.isfinite(self.sample_prio)
        per_cluster = filled.sum(-1).clamp_min(1).to(q.dtype)
        weight = (self.counts / per_cluster)[..., None].expand(-1, -1, -1, s)
        log_w = torch.where(filled, weight.log(), float("-inf")).flatten(2)
        den = scale * q @ self.sample_keys.flatten(2, 3).to(q.dtype).transpose(-1, -2) + log_w[:, :, None, :]
        if self.member_values is not None:
            return den, den, self.member_values.flatten(2, 3)

        t = self.value_samples
        tau = self.value_prio[..., t].clamp_min(0.0)  # -inf while fewer than t+1 pairs were seen
        w = self.value_weight[..., :t]
        kept = torch.isfinite(self.value_prio[..., :t]) & (w > 0)
        ratio = torch.where(kept, torch.maximum(w, tau[..., None]) / torch.where(kept, w, 1.0), 1.0)
        log_r = torch.where(kept, ratio.log(), float("-inf"))
        num = scale * q @ self.value_keys[:, :, :t].to(q.dtype).transpose(-1, -2) + log_r[:, :, None, :]
        return den, num, self.values[:, :, :t]


def _bottom_members(sample_prio: torch.Tensor, cluster: torch.Tensor, prio: torch.Tensor):
    """The new member priorities ``[B, H, M, s]`` of the clusters after candidates ``cluster``
    ``[B, H, n]`` with priorities ``prio`` arrive (the ``s`` smallest per cluster are kept), and a
    function ``keep(old [B, H, M, s, w], new [B, H, n, w])`` that gathers the kept members' rows."""
    batch, heads, capacity, s = sample_prio.shape
    device = cluster.device
    cand_cluster = torch.cat([torch.arange(capacity, device=device).repeat_interleave(s).expand(batch, heads, -1), cluster], dim=2)
    cand_prio = torch.cat([sample_prio.flatten(2), prio], dim=2)
    empty = torch.isinf(cand_prio)
    # float64: cluster id + priority/2 must keep every priority's order inside its cluster.
    order_key = torch.where(empty, float(capacity), cand_cluster.double() + cand_prio.double() * 0.5)
    order = order_key.argsort(dim=-1, stable=True)
    sorted_cluster = torch.gather(torch.where(empty, capacity, cand_cluster), 2, order)
    # Rank of each candidate inside its cluster: position minus the cluster's first position.
    position = torch.arange(order.shape[-1], device=device).expand_as(order)
    starts = torch.searchsorted(sorted_cluster.contiguous(), torch.arange(capacity, device=device).expand(batch, heads, -1).contiguous())
    rank = position - torch.gather(starts, 2, sorted_cluster.clamp(max=capacity - 1))
    keep = (rank < s) & (sorted_cluster < capacity)
    dest = torch.where(keep, sorted_cluster * s + rank, capacity * s)  # spill slot for the rest
    new_prio = torch.full((batch, heads, capacity * s + 1), float("inf"), dtype=cand_prio.dtype, device=device)
    new_prio.scatter_(2, dest, torch.where(keep, torch.gather(cand_prio, 2, order), float("inf")))

    def keep_rows(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        cand = torch.cat([old.flatten(2, 3), new.to(old.dtype)], dim=2)
        width = cand.shape[-1]
        out = cand.new_zeros(batch, heads, capacity * s + 1, width)
        out.scatter_(2, dest[..., None].expand(-1, -1, -1, width), torch.gather(cand, 2, order[..., None].expand(-1, -1, -1, width)))
        return out[:, :, :-1].view(batch, heads, capacity, s, width)

    return new_prio[..., :-1].view(batch, heads, capacity, s), keep_rows


def clustergen_attention(
    query: torch.Tensor,
    summary: ClusterGenSummary | None,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    *,
    scale: float | None = None,
    max_block_bytes: int = 1 << 30,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, q, D]`` over the summary plus an exact window ``[B, H, w, D]``.

    The last ``q`` window entries are the queries' own tokens and are attended causally; every
    summarised token lies before them. Numerator and denominator are each accumulated in
    log-sum-exp form with their own maximum. A long prefill runs in blocks of query tokens so
    that at most about ``max_block_bytes`` of logits exist at once. Returns ``[B, Hq, q, Dv]``.
    """
    batch, hq, q_len, dim = query.shape
    heads, w = window_keys.shape[1], window_keys.shape[2]
    summarised = 0 if summary is None else summary.sample_keys.shape[2] * summary.sample_keys.shape[3] + summary.value_samples
    block = max(1, max_block_bytes // (4 * batch * hq * (w + summarised)))
    if q_len > block:
        parts = []
        for start in range(0, q_len, block):
            end = min(q_len, start + block)
            visible = w - q_len + end  # the block's own tokens are the last of these
            parts.append(clustergen_attention(query[:, :, start:end], summary, window_keys[:, :, :visible],
                                              window_values[:, :, :visible], scale=scale, max_block_bytes=max_block_bytes))
        return torch.cat(parts, dim=2)
    groups = hq // heads
    scale = dim**-0.5 if scale is None else scale
    work = torch.promote_types(query.dtype, torch.float32)
    # Rows ordered (group, query token): each KV head's summary and window are read once.
    q = query.reshape(batch, heads, groups * q_len, dim).to(work)
    win = scale * q @ window_keys.to(work).transpose(-1, -2)  # [B, H, g*q, w]
    token = torch.arange(q_len, device=query.device).repeat(groups)[:, None]
    future = torch.arange(w, device=query.device)[None, :] - (w - q_len) > token
    win = win.masked_fill(future, float("-inf"))
    wv = window_values.to(work)
    if summary is None:
        out = torch.softmax(win, -1) @ wv
    else:
        den, num, sampled_values = summary.log_terms(q, scale)
        log_den = torch.logsumexp(torch.cat([den.to(work), win], dim=-1), -1, keepdim=True)
        num_logits = torch.cat([num.to(work), win], dim=-1)
        m = num_logits.amax(-1, keepdim=True)
        numerator = torch.exp(num_logits - m) @ torch.cat([sampled_values.to(work), wv], dim=-2)
        out = numerator * torch.exp(m - log_den)
    return out.reshape(batch, hq, q_len, -1).to(query.dtype)


def radius_scale(keys: torch.Tensor, radius: str = "norm") -> float:
    """The unit of ClusterGen's ``delta`` for keys ``[..., n, d]``: their median norm (``"norm"``)
    or their median distance from their mean over ``n`` (``"spread"``)."""
    keys = keys.float()
    if radius == "spread":
        keys = keys - keys.mean(dim=-2, keepdim=True)
    return torch.linalg.vector_norm(keys, dim=-1).median().item()


@register
@dataclass(frozen=True)
class ClusterGen(Method):
    """ClusterGen's summary: sinks and a recent window exact, older tokens as clustered samples.

    Its memory follows from its settings, not from the shared ratio; it runs in its own cache
    layer (:class:`chelsea.cache.ClusterGenLayer`). On SmolLM2-135M keys, ``delta=0.5`` opened
    about one cluster per two tokens (a summary larger than the full cache); 1.0 kept 35-44% of
    the full cache's bytes at 1K-4K tokens (``benchmarks/clustergen_error.py``). With the
    members' values as numerator, Qwen2.5-Coder-0.5B's mean relative attention error was
    0.31-0.69 against 213-39,231 with the paper's value sample (``results/archive/issue4``).
    """

    name = "clustergen"
    summary = "online key clusters with sampled members estimate the softmax sums (ClusterGen / SubGen); memory set by delta"
    paper = "ClusterGen (ICLR 2025 submission), SubGen arXiv 2402.06082"
    layer = "clustergen"
    takes_ratio = False

    delta: float = setting(1.0, "cluster radius relative to the median key norm of the first summarised block (or their "
                                "spread, radius='spread'); a key joins the nearest cluster within it or opens a new one", low=0.0)
    cluster_samples: int = setting(4, "member keys kept per cluster (a uniform sample) for the softmax denominator", low=1)
    value_samples: int = setting(256, "(key, value) pairs sampled by squared value norm for the numerator (numerator='values')",
                                 low=1)
    numerator: str = setting("clusters", "numerator from the sampled members' values ('clusters') or the paper's value-norm "
                                         "sample ('values')", choices=("clusters", "values"))
    radius: str = setting("norm", "what delta is relative to: the keys' median 'norm' or their median distance from their "
                                  "mean ('spread')", choices=("norm", "spread"))

    def new_summary(self, keys: torch.Tensor, values: torch.Tensor) -> ClusterGenSummary:
        """An empty summary for the (row, head)s of ``keys``/``values`` ``[B, H, n, D]``, its
        radius set from these first keys to be summarised."""
        batch, heads, _, dim = keys.shape
        return ClusterGenSummary.empty(batch, heads, dim, values.shape[-1], delta=self.delta * radius_scale(keys, self.radius),
                                       cluster_samples=self.cluster_samples, value_samples=self.value_samples,
                                       numerator=self.numerator, dtype=keys.dtype, device=keys.device)

    def attention(self, query: torch.Tensor, summary: ClusterGenSummary | None, keys: torch.Tensor, values: torch.Tensor,
                  scale: float | None) -> torch.Tensor:
        """The queries' attention over ``summary`` plus the exact entries (:func:`clustergen_attention`)."""
        return clustergen_attention(query, summary, keys, values, scale=scale)
