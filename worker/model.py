"""The BLIP captioning model family behind one small wrapper: lazy, thread-safe loading and batched
``generate`` on already-normalised pixel arrays.

Notes checked against the installed transformers (5.24):

* ``BlipForConditionalGeneration.generate`` overwrites ``input_ids[:, 0]`` with the ``[DEC]`` bos
  token and drops the *last* prompt token itself (it expects the tokenizer's trailing ``[SEP]``),
  so a prompt is passed exactly as the tokenizer returns it, ``[CLS] ... [SEP]``.
* The text decoder caches cross-attention keys/values: ``BlipTextSelfAttention.forward`` reuses
  ``EncoderDecoderCache.cross_attention_cache`` once ``is_updated[layer]`` is set, so the image
  keys/values are projected once per ``generate``, not once per token.
* BLIP has no SDPA attention (``_supports_sdpa`` is False); asking for it raises, so it is only
  requested where the class supports it.
* Loading (device/dtype, local or hub, offline detection, uint8 normalisation) is shared with the
  retrieval model in :mod:`imgq.worker.loading`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from transformers import BlipForConditionalGeneration

from imgq.contract import CaptionParams
from imgq.worker.loading import BlipBase

# torch's sampling RNG is process-global: a seeded batch must not interleave with another
# sampling batch, or neither is reproducible.
_RNG_LOCK = threading.Lock()


class CaptionModel(BlipBase):
    """A BLIP captioning checkpoint (hub id or local directory); loads on first use."""

    model_class = BlipForConditionalGeneration
    kind = "caption model"
    hint = "Set IMGQ_CAPTION_MODEL to a local checkpoint directory (e.g. one written by `imgq dev tiny-model DIR`)."

    # -- inference -------------------------------------------------------------------------------

    def generate_ids(self, pixel_values: np.ndarray, params: CaptionParams) -> torch.Tensor:
        """Token ids (B, T) on the CPU: the bos token, the prompt tokens if any, then the caption."""
        self.load()
        assert self._model is not None
        self.check_pixels(pixel_values)
        batch = len(pixel_values)
        pixels = self.model_input(pixel_values)

        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "min_new_tokens": params.min_new_tokens,
            "num_beams": params.num_beams,
            "repetition_penalty": params.repetition_penalty,
            "do_sample": params.do_sample,  # explicit, so a checkpoint's generation_config can't flip it
        }
        if params.do_sample:
            kwargs.update(top_p=params.top_p, top_k=params.top_k, temperature=params.temperature)
        if params.prompt is not None:
            # Tokenised once and repeated: every image in the batch continues the same prompt.
            ids = self.tokenizer(params.prompt, return_tensors="pt").input_ids.to(self.device)
            kwargs["input_ids"] = ids.repeat(batch, 1)
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])

        with torch.inference_mode():
            if not params.do_sample:
                out = self._model.generate(pixel_values=pixels, **kwargs)
            else:
                with _RNG_LOCK, torch.random.fork_rng(devices=self._rng_devices()):
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    out = self._model.generate(pixel_values=pixels, **kwargs)
        return out.cpu()

    def caption(self, pixel_values: np.ndarray, params: CaptionParams) -> list[str]:
        """One caption per image of a (B, 3, H, W) batch: uint8 pixels, or float32 already normalised."""
        ids = self.generate_ids(pixel_values, params)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _rng_devices(self) -> list[int]:
        if self.device.startswith("cuda"):
            return [torch.device(self.device).index or torch.cuda.current_device()]
        return []
