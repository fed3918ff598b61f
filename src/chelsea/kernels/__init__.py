"""GPU kernels (Triton). Each has a PyTorch path that gives the same results on the CPU."""

from .decode_attention import kernel_applies, run_kernel
from .layer_tails import LayerTails
from .largest_attention import largest_attention_applies, largest_attention_kernel
from .slot_write import write_slot

__all__ = ["LayerTails", "kernel_applies", "largest_attention_applies", "largest_attention_kernel", "run_kernel", "write_slot"]
