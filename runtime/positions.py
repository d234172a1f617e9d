"""Position ids of a padded batch, from its attention mask."""

from __future__ import annotations

import torch


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of the rows of a padded batch: each real token its count in its row minus one (what
    `generate` gives a left-padded row), each pad 0 (pads are masked, so their positions are never read)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)
