"""The Triton decode kernel against the PyTorch path. Runs the kernel on CUDA machines only;
on the CPU it checks that the fallback is the PyTorch path itself."""

import pytest
import torch

from chelsea.attention import weighted_attention
from chelsea.kernels import decode_attention, kernel_applies

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
