"""GPU kernels (Triton). Each has a PyTorch path that gives the same results on the CPU."""

from .decode_attention import kernel_applies, run_kernel
from .layer_tails import LayerTails
from .learned_scores import fused_scoring_applies, score_tails
from .largest_attention import largest_attention_applies, largest_attention_kernel
from .row_spans import RowSpans
from .slot_write import write_slot

__all__ = ["LayerTails", "RowSpans", "fused_scoring_applies", "kernel_applies", "largest_attention_applies", "largest_attention_kernel", "run_kernel", "score_tails", "write_slot"]
