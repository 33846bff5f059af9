"""What an actor reads: `ModelInputs`, one batch of prompts with their image or view.

Every task turns its observations into `ModelInputs`; every model family turns
`ModelInputs` into logits. Rows `i * repeats ... (i + 1) * repeats - 1` share image (or view)
`i`: a GRPO group of one scene encodes its image once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

PAD, BOS = 0, 1  # token ids every task keeps: padding and begin-of-sequence


@dataclass
class ModelInputs:
    """`N = B * repeats` prompts; `B` images (built-in actor) or views as words (language models)."""

    pixels: torch.Tensor | None  # [B, 3, H, W] uint8 (0..255) or float (0..1), or None
    symbol_ids: torch.Tensor | None  # [B, S] the view as words (text-only language models), or None
    prompt_ids: torch.Tensor  # [N, T] right-padded with PAD
    lengths: torch.Tensor  # [N] prompt lengths
    repeats: int = 1
    # [N, T] 1 for tokens, 0 for left padding (prompts of different lengths), or None: all tokens
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> ModelInputs:
        return replace(self, **{k: _map(getattr(self, k), lambda t: t.to(device)) for k in _TENSORS})

    def select(self, index: torch.Tensor | slice) -> ModelInputs:
        """The rows at `index` (their images or views repeated once each; all rows in order keep
        the shared images)."""
        if self.repeats == 1:
            return replace(self, **{k: _map(getattr(self, k), lambda t: t[index]) for k in _TENSORS})
        rows = torch.arange(len(self))[index]  # [n]
        if len(rows) == len(self) and torch.equal(rows, torch.arange(len(self))):
            return self  # every row in order: keep one image per group (the encoder runs once per image)
        image = rows // self.repeats  # [n]
        return ModelInputs(_map(self.pixels, lambda t: t[image.to(t.device)]),
                           _map(self.symbol_ids, lambda t: t[image.to(t.device)]),
                           self.prompt_ids[rows.to(self.prompt_ids.device)], self.lengths[rows.to(self.lengths.device)],
                           attention_mask=_map(self.attention_mask, lambda t: t[rows.to(t.device)]))

    @staticmethod
    def cat(batches: Sequence[ModelInputs]) -> ModelInputs:
        """Concatenates batches of `repeats == 1` (prompts padded to the longest)."""
        width = max(b.prompt_ids.shape[1] for b in batches)
        prompts = [torch.nn.functional.pad(b.prompt_ids, (0, width - b.prompt_ids.shape[1]), value=PAD) for b in batches]

        def join(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            return None if parts[0] is None else torch.cat(parts)

        masks = None
        if any(b.attention_mask is not None for b in batches):
            masks = torch.cat([torch.nn.functional.pad(_mask(b), (0, width - b.prompt_ids.shape[1]), value=0)
                               for b in batches])
        return ModelInputs(join("pixels"), join("symbol_ids"), torch.cat(prompts), join("lengths"), attention_mask=masks)


def _mask(b: ModelInputs) -> torch.Tensor:
    return b.attention_mask if b.attention_mask is not None else torch.ones_like(b.prompt_ids)


_TENSORS = ("pixels", "symbol_ids", "prompt_ids", "lengths", "attention_mask")


def _map(t: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    return None if t is None else fn(t)
