"""Slow, obviously-correct loop versions of the methods, used only by the tests."""

import math

import torch


def naive_soft_matching_step(keys, values, log_counts, n_remove, chunk_size):
    """One merge step for a single (row, head): keys [L, D], values [L, Dv], log_counts [L]."""
    length = keys.shape[0]
    edges = []  # (similarity, a, b)
    for start in range(0, length, chunk_size):
        chunk = range(start, min(start + chunk_size, length))
        a_set = [i for i in chunk if (i - start) % 2 == 1]
        b_set = [i for i in chunk if (i - start) % 2 == 0]
        for a in a_set:
            sims = [torch.nn.functional.cosine_similarity(keys[a], keys[b], dim=0).item() for b in b_set]
            best = max(range(len(b_set)), key=lambda j: sims[j])
            edges.append((sims[best], a, b_set[best]))
    edges.sort(key=lambda e: -e[0])
    chosen = edges[:n_remove]
    counts = log_counts.double().exp().tolist()
    k, v, c = keys.double().clone(), values.double().clone(), list(counts)
    members = {}
    for _, a, b in chosen:
        members.setdefault(b, []).append(a)
    removed = {a for _, a, _ in chosen}
    for b, group in members.items():
        idx = [b, *group]
        w = torch.tensor([counts[i] for i in idx], dtype=torch.float64)
        k[b] = (w[:, None] * keys.double()[idx]).sum(0) / w.sum()
        v[b] = (w[:, None] * values.double()[idx]).sum(0) / w.sum()
        c[b] = float(w.sum())
    keep = [i for i in range(length) if i not in removed]
    return k[keep], v[keep], torch.tensor([math.log(c[i]) for i in keep], dtype=torch.float64)
