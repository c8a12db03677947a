"""Upper bounds on every size a recipe can state: what no real model needs and what would exhaust
memory or overflow a tensor's size before anything could be refused. Specs check their own
sizes against them; components bound their params with them (``le=LIMITS[...]``)."""
from __future__ import annotations

LIMITS: dict[str, int] = {
    "depth": 10_000,
    "embed_dim": 2**20,  # any width: tokens, hidden layers, channels, heads
    "mlp_hidden_dim": 2**24,
    "num_classes": 2**24,
    "reg_tokens": 2**16,  # any count of extra tokens (registers, latent queries)
    "in_chans": 2**12,
    "img_size": 2**16,  # any side in pixels or patches: images, kernels, windows, strides
}

MAX_BATCH = 2**24
"""The largest batch size any command accepts: beyond it element counts of a ViT's activations
approach int64 and no machine holds the batch anyway."""
