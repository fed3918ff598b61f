"""The Triton decode kernel against the PyTorch path. Runs the kernel on CUDA machines only;
on the CPU it checks that the fallback is the PyTorch path itself."""

import os

import pytest
import torch

from chelsea.attention import decode_attention, weighted_attention
from chelsea.kernels import kernel_applies

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(batch, hq, h, q_len, n, dim, dtype, device, bias=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, hq, q_len, dim, generator=g, device=device).to(dtype)
    k = torch.randn(batch, h, n, dim, generator=g, device=device).to(dtype)
    v = torch.randn(batch, h, n, dim, generator=g, device=device).to(dtype)
    lc = None
    if bias:
        lc = torch.log(torch.randint(1, 6, (batch, h, n), generator=g, device=device).float())
        lc[:, :, : n // 10] = float("-inf")  # some padding entries
        lc[:, :, -q_len:] = 0.0
    return q, k, v, lc


def test_cpu_fallback_is_the_pytorch_path():
    q, k, v, lc = _inputs(2, 6, 2, 1, 100, 64, torch.float32, "cpu")
    assert not kernel_applies(q, k, v)
    assert torch.equal(decode_attention(q, k, v, lc), weighted_attention(q, k, v, lc))


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "batch,hq,h,q_len,n,dim",
    [(1, 32, 8, 1, 4096, 128), (4, 14, 2, 1, 1000, 64), (2, 9, 3, 1, 77, 64), (3, 8, 8, 1, 33000, 128),
     (2, 32, 8, 4, 2048, 128), (1, 14, 2, 3, 513, 64)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_pytorch(dtype, tol, batch, hq, h, q_len, n, dim, bias):
    q, k, v, lc = _inputs(batch, hq, h, q_len, n, dim, dtype, "cuda", bias)
    assert kernel_applies(q, k, v)
    got = decode_attention(q, k, v, lc).float()
    want = weighted_attention(q.double(), k.double(), v.double(), None if lc is None else lc.double()).float()  # torch path
    rel = (got - want).norm() / want.norm()
    assert rel < tol, rel.item()


@cuda
def test_kernel_reads_strided_slices():
    """Keys and values that are views into larger preallocated buffers."""
    q, k, v, lc = _inputs(2, 8, 2, 1, 3000, 128, torch.bfloat16, "cuda")
    big_k = torch.zeros(2, 2, 5000, 128, dtype=k.dtype, device="cuda")
    big_v = torch.zeros_like(big_k)
    big_k[:, :, :3000], big_v[:, :, :3000] = k, v
    got = decode_attention(q, big_k[:, :, :3000], big_v[:, :, :3000], lc).float()
    want = decode_attention(q, k, v, lc).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@cuda
def test_weighted_attention_uses_the_kernel_on_cuda():
    q, k, v, lc = _inputs(2, 8, 2, 1, 500, 64, torch.bfloat16, "cuda")
    assert torch.equal(weighted_attention(q, k, v, lc), decode_attention(q, k, v, lc))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("zeroed", [0, 1, 2])
@pytest.mark.parametrize("dim,dim_v", [(64, 64), (128, 96)])
def test_slot_write_equals_index_copy(device, zeroed, dim, dim_v):
    """The one-launch slot write (Triton on CUDA) does what index_copy_ and index_fill_ do, and
    leaves every other entry alone; the new key may be a non-contiguous view."""
    from chelsea.kernels import write_slot

    g = torch.Generator(device=device).manual_seed(1)
    bufs = [torch.randn(3, 4, 20, d, generator=g, device=device).to(torch.bfloat16) for d in (dim, dim_v)]
    stats = [torch.randn(3, 4, 20, generator=g, device=device) for _ in range(zeroed)]
    key = torch.randn(3, 1, 4, dim, generator=g, device=device).to(torch.bfloat16).transpose(1, 2)
    value = torch.randn(3, 4, 1, dim_v, generator=g, device=device).to(torch.bfloat16)
    slot = torch.tensor([13], device=device)
    want = [b.clone() for b in bufs + stats]
    want[0].index_copy_(2, slot, key)
    want[1].index_copy_(2, slot, value)
    for t in want[2:]:
        t.index_fill_(2, slot, 0.0)
    write_slot(slot, key, value, *bufs, *stats)
    for got, expected in zip(bufs + stats, want, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("n", [1, 3, 37])
def test_layer_tails_read_and_write_every_layers_newest_entries(device, n):
    """One read (one launch on CUDA) gives every layer's last ``n`` entries before its own end, in
    buffers of different capacities; one write sets exactly those entries' channel 1."""
    from chelsea.kernels import LayerTails

    g = torch.Generator(device=device).manual_seed(2)
    capacities, ends = [80, 64, 120], [70, 40, 120]
    keys = [torch.randn(2, 3, c, 64, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    values = [torch.randn(2, 3, c, 96, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    counts = [torch.randn(2, 3, c, 2, generator=g, device=device) for c in capacities]
    tails = LayerTails(keys, values, counts, ends, n, channel=1)
    assert tails.uniform and tails.kernel == (device == "cuda")
    got_k, got_v = tails.read()
    assert torch.equal(got_k, torch.stack([k[:, :, e - n : e] for k, e in zip(keys, ends)]))
    assert torch.equal(got_v, torch.stack([v[:, :, e - n : e] for v, e in zip(values, ends)]))
    want = [c.clone() for c in counts]
    scores = torch.randn(3, 2, 3, n, generator=g, device=device)
    for w, e, s in zip(want, ends, scores):
        w[:, :, e - n : e, 1] = s
    tails.write(scores)
    for got, expected in zip(counts, want, strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("n", [1, 5, 37])
def test_fused_learned_scores_equal_the_scorers_pytorch_path(device, n):
    """On CUDA two launches write what the learned scorer's PyTorch path computes for every layer's
    newest entries (own score plus the fact weight times the agreement averaged over layers), and
    nothing else; on the CPU the fused path does not apply."""
    from chelsea.kernels import LayerTails, fused_scoring_applies, score_tails
    from chelsea.scoring.learned import LearnedScorer

    g = torch.Generator(device=device).manual_seed(3)
    heads, dim, dim_v, capacities, ends = 2, 64, 64, [80, 64, 120], [70, 40, 120]
    keys = [torch.randn(2, heads, c, dim, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    values = [torch.randn(2, heads, c, dim_v, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    counts = [torch.randn(2, heads, c, 2, generator=g, device=device) for c in capacities]
    weights = torch.randn(3, heads * (dim_v + dim // 2) + 1, heads + 1, generator=g, device=device) * 0.05
    tails = LayerTails(keys, values, counts, ends, n, channel=1)
    assert fused_scoring_applies(tails, weights) == (device == "cuda")
    if device == "cpu":
        return
    own, agreed = LearnedScorer(list(weights))._predict_stacked([0, 1, 2], *tails.read())
    want = [c.clone() for c in counts]
    for w, e, s in zip(want, ends, own + 100.0 * agreed[None, :, None, :]):
        w[:, :, e - n : e, 1] = s
    score_tails(tails, weights, 100.0)
    for got, expected in zip(counts, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


# The due rows of many layers, read and rewritten by one launch each ------------------------------

_kernels_run = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter runs them on the CPU


@pytest.mark.skipif(not _kernels_run, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("channels", [None, 2])
def test_row_spans_read_and_rewrite_rows_in_place(channels):
    """Rows of layers of different capacities and lengths, several rows of one layer: the read
    gives each row's last ``span`` entries; the rewrite puts each row's first ``kept`` new entries
    at its end, moves its older entries up by what was removed (also by fewer slots than a
    block, and by none) and fills the slots they left with padding; other rows stay as they were."""
    from chelsea.cache.storage import pad_slots
    from chelsea.kernels import RowSpans

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(4)
    heads, dim, dim_v, span = 2, 64, 96, 40
    capacities, lengths = [300, 130, 200], [290, 100, 200]
    tail = () if channels is None else (channels,)
    keys = [torch.randn(3, heads, c, dim, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    values = [torch.randn(3, heads, c, dim_v, generator=g, device=device).to(torch.bfloat16) for c in capacities]
    counts = [torch.randn(3, heads, c, *tail, generator=g, device=device) for c in capacities]
    # (layer, row, real entries stored, entries kept of the span)
    items = [(0, 0, 290, 3), (0, 2, 150, 39), (1, 1, 100, 40), (2, 0, 45, 10), (2, 2, 200, 1)]
    spans = RowSpans([keys[i] for i, *_ in items], [values[i] for i, *_ in items], [counts[i] for i, *_ in items],
                     [b for _, b, *_ in items], [lengths[i] for i, *_ in items], [s for _, _, s, _ in items], span)
    got = spans.read()
    for t, bufs in zip(got, (keys, values, counts)):
        assert torch.equal(t, torch.stack([bufs[i][b, :, lengths[i] - span : lengths[i]] for i, b, *_ in items]))
    new = tuple(torch.randn(len(items), heads, span, *shape, generator=g, device=device).to(t.dtype)
                for t, shape in zip(got, ((dim,), (dim_v,), tail)))
    want = [[t.clone() for t in bufs] for bufs in (keys, values, counts)]
    for n, (i, b, stored, kept) in enumerate(items):
        for w, name, fresh in zip(want, ("_key_buf", "_value_buf", "_count_buf"), new):
            row, end = w[i][b : b + 1], lengths[i]
            older = row[:, :, end - stored : end - span].clone()
            row[:, :, end - stored + span - kept : end - kept] = older
            row[:, :, end - kept : end] = fresh[n : n + 1, :, :kept]
            row[:, :, end - stored : end - stored + span - kept] = pad_slots(name, row, span - kept)
    spans.rewrite(new, [kept for *_, kept in items])
    for w, bufs in zip(want, (keys, values, counts)):
        for expected, buf in zip(w, bufs, strict=True):
            assert torch.equal(buf, expected)


@cuda
@pytest.mark.parametrize("method,ratio", [("chelsea", 0.8), ("chelsea-paper", 0.5)])
def test_row_spans_compress_joined_rows_as_the_pytorch_path(method, ratio, monkeypatch):
    """A batch of joined rows of different lengths, compressing every due row of every layer
    after a step: the kernels leave every buffer as the PyTorch path does."""
    import copy

    from chelsea import ClusteredCache, CompressionConfig
    from chelsea.kernels import RowSpans

    g = torch.Generator(device="cuda").manual_seed(5)
    batch = ClusteredCache(CompressionConfig(ratio=ratio, window=16), method=method)
    for n in (300, 180, 420):
        part = ClusteredCache(CompressionConfig(ratio=ratio, window=16), method=method).holding(
            [(torch.randn(1, 2, n, 64, generator=g, device="cuda").to(torch.bfloat16),
              torch.randn(1, 2, n, 64, generator=g, device="cuda").to(torch.bfloat16)) for _ in range(3)])
        for layer in part.layers:
            if layer.scores is not None:
                layer.scores.copy_(torch.rand(layer.scores.shape, generator=g, device="cuda"))
        batch.append_rows(part)
    for layer in batch.layers:
        layer.row_since = [layer.every] * 3  # every row due
    alike = copy.deepcopy(batch)
    batch.compress_due()
    monkeypatch.setattr(RowSpans, "applies", staticmethod(lambda *buffers: False))
    alike.compress_due()
    for mine, theirs in zip(batch.layers, alike.layers, strict=True):
        assert mine.length == theirs.length and mine.compressions == theirs.compressions > 0
        for a, b in zip(mine._entries(), theirs._entries(), strict=True):
            assert torch.equal(a, b)


# Chelsea's merge step: the two chunk-local kernels against the PyTorch functions ---------------

from chelsea.kernels import soft_matching  # noqa: E402
from chelsea.methods.chelsea_paper import _a_positions, _best_edges, _merge_edges, chunked_soft_matching, max_removable  # noqa: E402

MERGE_SHAPES = [(1, 8, 4096, 128, 32), (2, 3, 1000, 64, 16), (1, 2, 77, 64, 64), (3, 2, 517, 96, 32), (1, 1, 31, 128, 32)]


def _region(batch, heads, length, dim, dtype, seed=0):
    """Keys and values as strided slices of larger buffers (like a cache's region), log-counts of 1-4 tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(batch, heads, length + 40, dim, generator=g, device="cuda").to(dtype)[:, :, 7 : 7 + length]
    values = torch.randn(batch, heads, length + 40, dim, generator=g, device="cuda").to(dtype)[:, :, 3 : 3 + length]
    counts = torch.randint(1, 5, (batch, heads, length), generator=g, device="cuda").float()
    return keys, values, counts.log()


def test_merge_kernels_do_not_apply_on_the_cpu():
    keys = torch.zeros(1, 1, 64, 64)
    assert not soft_matching.kernel_applies(keys, keys, keys[..., 0], 32)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,length,dim,chunk", MERGE_SHAPES)
def test_best_edges_kernel_matches_pytorch(dtype, batch, heads, length, dim, chunk):
    keys, values, log_counts = _region(batch, heads, length, dim, dtype)
    assert soft_matching.kernel_applies(keys, values, log_counts, chunk)
    sims, pos = soft_matching.best_edges(keys, chunk)
    ref_sims, ref_pos = _best_edges(keys, chunk)
    assert sims.shape == ref_sims.shape == (batch, heads, max_removable(length, chunk))
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-5)
    # Where the two picked different B entries, both are equally similar (a near tie).
    unit = torch.nn.functional.normalize(keys.double(), dim=-1)
    a = _a_positions(length, chunk, keys.device).expand(batch, heads, -1)
    pick = lambda p: (unit.gather(2, a[..., None].expand(-1, -1, -1, dim)) * unit.gather(2, p[..., None].expand(-1, -1, -1, dim))).sum(-1)  # noqa: E731
    assert (pick(pos) - pick(ref_pos)).abs().max() < 1e-5
    assert ((pos // chunk) == (a // chunk)).all()  # every match stays in its chunk
    assert (pos % chunk % 2 == 0).all()


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch,heads,length,dim,chunk", MERGE_SHAPES)
def test_merge_kernel_matches_pytorch(dtype, tol, batch, heads, length, dim, chunk):
    keys, values, log_counts = _region(batch, heads, length, dim, dtype, seed=1)
    sims, pos = _best_edges(keys, chunk)
    chosen = sims.topk(max(1, sims.shape[-1] * 2 // 3), dim=-1).indices
    src = _a_positions(length, chunk, keys.device)[chosen]
    dst = pos.gather(-1, chosen)
    out = soft_matching.merge_chosen(keys, values, log_counts, pos, chosen, chunk)
    ref = _merge_edges(keys, values, log_counts, src, dst)
    for got, want in zip(out, ref):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    # Entries nothing merged into are copied bit for bit, counts add up to the tokens.
    keep = torch.ones_like(log_counts, dtype=torch.bool).scatter_(-1, src, False)
    untouched = keep & ~torch.zeros_like(keep).scatter_(-1, dst, True)
    place = keep.long().cumsum(-1) - 1
    for b in range(batch):
        for h in range(heads):
            rows = place[b, h][untouched[b, h]]
            assert torch.equal(out[0][b, h, rows], keys[b, h, untouched[b, h]])
            assert torch.equal(out[1][b, h, rows], values[b, h, untouched[b, h]])
    torch.testing.assert_close(out[2].exp().sum(-1), log_counts.exp().sum(-1))


@cuda
def test_chunked_soft_matching_on_cuda_keeps_its_contract():
    keys, values, log_counts = _region(2, 4, 3000, 128, torch.bfloat16, seed=2)
    log_counts = torch.zeros_like(log_counts)
    k, v, lc = chunked_soft_matching(keys, values, log_counts, 2400, sink_tokens=4, window=64)
    assert k.shape == (2, 4, 600, 128) and v.shape == k.shape and lc.shape == (2, 4, 600)
    torch.testing.assert_close(lc.exp().sum(-1), torch.full((2, 4), 3000.0, device="cuda"))
    assert torch.equal(k[:, :, :4], keys[:, :, :4]) and torch.equal(v[:, :, -64:], values[:, :, -64:])


def _written_out_largest_attention(query, key, bias, old, scale):
    """Every query head of a KV head, every query, softmax over all keys it sees (the ``old``
    ones and its own causally), then the largest probability each of the ``old`` keys gets."""
    batch, heads, m, dim = query.shape
    kv_heads = key.shape[1]
    logits = query.double().reshape(batch, kv_heads, heads // kv_heads, m, dim) @ key.double()[:, :, None].transpose(-1, -2)
    logits = logits * scale
    if bias is not None:
        logits = logits + bias.double()[:, :, None, None, :]
    own = torch.arange(m, device=query.device)
    logits[..., old:] = logits[..., old:].masked_fill(own[None, :] > own[:, None], float("-inf"))
    return logits.softmax(-1)[..., :old].amax(dim=(2, 3)).float()


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim,old,m,biased", [
    (14, 2, 64, 4100, 2070, True),  # Qwen2.5-0.5B's layout, one reconstruction chunk
    (8, 8, 128, 70, 33, False),  # no grouping, blocks that are not full
    (6, 2, 80, 130, 5, True),  # a head size that is not a power of two
])
def test_largest_attention_kernel_matches_the_softmax_written_out(dtype, heads, kv_heads, dim, old, m, biased):
    from chelsea.scoring.reconstruction import _largest_attention_torch
    from chelsea.kernels import largest_attention_applies, largest_attention_kernel

    g = torch.Generator(device="cuda").manual_seed(5)
    query = (torch.randn(2, m, heads, dim, generator=g, device="cuda") * 2).to(dtype).transpose(1, 2)  # as the model lays it out
    key = torch.randn(2, kv_heads, old + m, dim, generator=g, device="cuda").to(dtype)
    bias = None
    if biased:
        bias = torch.randn(2, kv_heads, old + m, generator=g, device="cuda").clamp(min=0)
        bias[:, :, 3:9] = float("-inf")  # hidden entries (padding) get no attention
    scale = dim**-0.5
    assert largest_attention_applies(query, key)
    got = largest_attention_kernel(query, key, bias, old, scale)
    want = _written_out_largest_attention(query, key, bias, old, scale)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(got, _largest_attention_torch(query, key, bias, old, scale), rtol=2e-4, atol=1e-7)
    if biased:
        assert bool((got[:, :, 3:9] == 0).all())


@cuda
@pytest.mark.parametrize("kv_heads,old,m", [(2, 4100, 2070), (14, 70, 33)])
def test_flash_normaliser_gives_the_scores_and_the_output_of_the_separate_passes(kv_heads, old, m):
    """The repeat takes each query's log-normaliser from the flash kernel that computes its output:
    the output equals weighted_attention's, the scores equal those the kernel's own normaliser
    pass gives and the softmax written out."""
    from chelsea.attention import causal_attention_with_normaliser, weighted_attention
    from chelsea.kernels import largest_attention_kernel

    g = torch.Generator(device="cuda").manual_seed(7)
    query = torch.randn(2, m, 14, 64, generator=g, device="cuda").to(torch.bfloat16).transpose(1, 2)
    key = torch.randn(2, kv_heads, old + m, 64, generator=g, device="cuda").to(torch.bfloat16)
    value = torch.randn(2, kv_heads, old + m, 64, generator=g, device="cuda").to(torch.bfloat16)
    got = causal_attention_with_normaliser(query, key, value, scale=0.125)
    assert got is not None
    out, lse = got
    assert lse.shape == (2, 14, m) and lse.dtype == torch.float32
    torch.testing.assert_close(out, weighted_attention(query, key, value, scale=0.125), rtol=2e-2, atol=2e-2)
    scores = largest_attention_kernel(query, key, None, old, 0.125, lse=lse)
    torch.testing.assert_close(scores, largest_attention_kernel(query, key, None, old, 0.125), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(scores, _written_out_largest_attention(query, key, None, old, 0.125), rtol=2e-3, atol=1e-6)


@cuda
def test_largest_attention_kernel_weighs_each_query_head_as_the_pytorch_path():
    """``log_weight`` (output-norm scoring) is added per query head before the maximum over the
    group, in the kernel as in the PyTorch path."""
    from chelsea.scoring.reconstruction import _largest_attention_torch
    from chelsea.kernels import largest_attention_kernel

    g = torch.Generator(device="cuda").manual_seed(6)
    query = torch.randn(1, 14, 40, 64, generator=g, device="cuda").to(torch.bfloat16)
    key = torch.randn(1, 2, 300 + 40, 64, generator=g, device="cuda").to(torch.bfloat16)
    log_weight = torch.randn(1, 2, 7, 300, generator=g, device="cuda")
    got = largest_attention_kernel(query, key, None, 300, 0.125, log_weight=log_weight)
    want = _largest_attention_torch(query, key, None, 300, 0.125, log_weight=log_weight)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-7)
    assert not torch.allclose(got, largest_attention_kernel(query, key, None, 300, 0.125))
