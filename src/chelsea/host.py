"""Host numbers as device tensors, copied without waiting for the device.

``torch.tensor(numbers, device="cuda")`` copies from pageable memory and then waits until the
device has run everything queued before it (PyTorch synchronises the stream after a blocking
copy). A compression that builds an index tensor per layer would wait for the GPU once per
layer, and the host could never run ahead of it. From pinned memory the copy is queued like a
kernel and the host goes on; PyTorch keeps the pinned block until the copy has run.
"""

from __future__ import annotations

import torch


def on_device(numbers, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``numbers`` (a list, possibly nested) as a ``dtype`` tensor on ``device``, without waiting for it."""
    host = torch.tensor(numbers, dtype=dtype)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
