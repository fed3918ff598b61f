"""Surprisal: how unexpected each context token was to the model, read off the prefill itself.

``-log p(token | what came before)`` costs only the output layer over the prefill's hidden
states. Facts planted in other text (names, numbers, codes) are the least predictable tokens;
``chelsea`` adds ``surprise_weight * min(1, surprisal / SURPRISE_SCALE)`` to every layer's and
head's score of the token.
"""

from __future__ import annotations

import torch

from ..compat import cache_arg

SURPRISE_SCALE = 10.0  # nats: a token this unexpected (a random digit, say) gets the full weight


def token_surprisal(model, hidden: torch.Tensor, input_ids: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``-log p(token_i | tokens before i)`` ``[batch, n]`` float32 from the last hidden states
    ``[batch, n, d]`` (0 for the first token), through the output layer a block at a time."""
    head = model.get_output_embeddings()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    for start in range(0, input_ids.shape[1] - 1, block):
        stop = min(input_ids.shape[1] - 1, start + block)
        logits = head(hidden[:, start:stop])
        target = logits.gather(-1, input_ids[:, start + 1 : stop + 1, None].to(hidden.device))[..., 0]
        # log p = logit - logsumexp: one reduction over the vocabulary, no log-probability tensor written
        out[:, start + 1 : stop + 1] = logits.logsumexp(-1).float() - target.float()
    return out


def prefill_with_surprisal(model, cache, input_ids, attention_mask):
    """The prefill through the decoder alone, then the last position's logits and every token's surprisal."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, **cache_arg(decoder, cache), use_cache=True).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -1:])
    return logits, token_surprisal(model, hidden, input_ids)


def surprisal_bonus(surprise: torch.Tensor, weight: float) -> torch.Tensor:
    """What ``weight`` adds to every layer's and head's score of each token: ``[batch, n]``."""
    return weight * (surprise / SURPRISE_SCALE).clamp(max=1.0)
