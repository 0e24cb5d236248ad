"""The one LoRA layout imgq trains (``imgq finetune``) and serves (``imgq enqueue caption --adapter``):
adapters on the attention of BLIP's text decoder only. The vision encoder is never adapted, so one
batch's image features serve every adapter in it.

Shared by training and serving so that an adapter trained here always loads there.
"""

from __future__ import annotations

from typing import Any

# Full module paths inside BlipForConditionalGeneration: self- and cross-attention projections of
# every decoder layer (query/key/value and the attention output). Anchored at text_decoder so the
# vision encoder's own attention is never matched.
TARGET_MODULES = (r"text_decoder\.bert\.encoder\.layer\.\d+\."
                  r"(attention|crossattention)\.(self\.(query|key|value)|output\.dense)")
DEFAULT_RANK = 8
DEFAULT_ALPHA = 16


def lora_config(rank: int = DEFAULT_RANK, alpha: int = DEFAULT_ALPHA, dropout: float = 0.0,
                **extra: Any) -> Any:
    """The ``peft.LoraConfig`` of an imgq adapter (``extra``: e.g. ``trainable_token_indices`` for a
    tokenizer extended with another script's characters)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGET_MODULES,
                      bias="none", **extra)
