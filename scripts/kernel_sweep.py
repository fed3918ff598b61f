"""Tile size, warps, pipeline stages and split target of the decode kernel (chose the defaults).

Timed as in a decoding step: 32 layers' caches of the llama3-8b attention shape (8 KV heads,
32 query heads, head size 128, bf16), all 32 calls recorded in one CUDA graph and replayed, so
launch latency and L2 reuse do not distort small caches. Prints, per (stored entries, batch), the
four fastest settings and the old default's time, with the fraction of copy bandwidth reached.
Usage: PYTHONPATH=src python3 scripts/kernel_sweep.py [NxB ...]   e.g. 6592x4
"""
import itertools, torch, sys
sys.path.insert(0, "benchmarks")
from decode_kernel import copy_bandwidth
from chelsea.attention import decode_attention
bw = copy_bandwidth()
print("copy GB/s", round(bw / 1e9), flush=True)
L = 32
only = sys.argv[1:] and [tuple(map(int, a.split("x"))) for a in sys.argv[1:]]
for n, batch in only or [(6592, 1), (6592, 4), (6592, 24), (26048, 1), (26048, 4), (32800, 4)]:
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(batch, 8, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    vs = [torch.randn_like(k) for k in ks]
    lc = torch.zeros(batch, 8, n, device="cuda")
    def timed_graph(kw):
        for i in range(L):
            decode_attention(q, ks[i], vs[i], lc, **kw)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(L):
                decode_attention(q, ks[i], vs[i], lc, **kw)
        g.replay(); torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10): g.replay()
        e.record(); torch.cuda.synchronize()
        return s.elapsed_time(e) / 10 / 1e3
    res = []
    for bn, nw, ns, tp in itertools.product([64, 128], [4, 8], [None, 2, 4], [264, 528, 1056, 2112]):
        try:
            t = timed_graph(dict(block_n=bn, num_warps=nw, num_stages=ns, target_programs=tp))
        except Exception as e:
            continue
        res.append((t, bn, nw, ns, tp))
    byt = L * (ks[0].numel() * 4 + lc.numel() * 4)
    d = [r for r in res if r[1:] == (128, 4, None, 528)][0]  # the default before this sweep
    res.sort(key=lambda r: r[0])
    print(n, batch, "best", [(round(t*1e3, 3), bn, nw, ns, tp, round(byt / t / bw, 3)) for t, bn, nw, ns, tp in res[:4]],
          "default ms", round(d[0]*1e3, 3), round(byt/d[0]/bw, 3), flush=True)
    del ks, vs
