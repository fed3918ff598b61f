"""Tile size, warps and split target of the decode kernel on a CUDA machine (chose the defaults).

Prints, per (context, batch) of the llama3-8b attention shape at ratio 0.8, the three fastest
settings and the default's time, with the fraction of copy bandwidth each reaches.
Usage: PYTHONPATH=src python3 scripts/kernel_sweep.py
"""

import itertools, torch, sys
sys.path.insert(0, "benchmarks")
from decode_kernel import timed, copy_bandwidth
from chelsea.kernels import decode_attention
bw = copy_bandwidth()
for n, batch in [(32768, 1), (32768, 8), (131072, 1), (131072, 8), (131072, 32)]:
    kept = n // 5
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, 8, kept, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    lc = torch.zeros(batch, 8, kept, device="cuda")
    res = []
    for bn, nw, tp in itertools.product([32, 64, 128], [2, 4, 8], [132, 264, 528, 1056]):
        t = timed(lambda: decode_attention(q, k, v, lc, block_n=bn, num_warps=nw, target_programs=tp), reps=30)
        res.append((t, bn, nw, tp))
    res.sort()
    byt = k.numel() * 4 + lc.numel() * 4
    print(n, batch, "best", [(round(t*1e3, 4), bn, nw, tp, round(byt / t / bw, 3)) for t, bn, nw, tp in res[:3]], "default", [(round(t*1e3,4), round(byt/t/bw,3)) for t, bn, nw, tp in res if (bn, nw, tp) == (128, 4, 528)], flush=True)
    del k, v
