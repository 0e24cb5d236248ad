"""BLIP image-text retrieval (``BlipForImageTextRetrieval``): 256-d image and text embeddings for
the vector index, and image-text match scores, on the same loading as the caption model.

Notes checked against the installed transformers (5.24):

* ``BlipForImageTextRetrieval.forward`` always runs the vision encoder *and* the text encoder and
  returns either ITM logits or an image x text similarity matrix, so each feature is computed here
  from the submodules, exactly as that forward computes it: the image feature is
  ``normalize(vision_proj(last_hidden_state[:, 0]))`` and the text feature is
  ``normalize(text_proj(text_encoder(ids, mask).last_hidden_state[:, 0]))`` with no image.
* ``BlipVisionModel``'s ``pooler_output`` is *not* ``last_hidden_state[:, 0]``: it applies
  ``post_layernorm`` a second time. The retrieval head was trained on the single-norm [CLS], so
  ``pooler_output`` must not be used. ``get_image_features``/``get_text_features`` exist only on
  ``BlipModel`` (its ``visual_projection``/``text_projection``, which this class does not have).
* For ITM the original BLIP replaces the first token ([CLS]) with ``[ENC]`` before the
  image-grounded text encoder (``blip_itm.py``: ``input_ids[:, 0] = tokenizer.enc_token_id``);
  transformers 5 does not, it feeds [CLS] (huggingface/transformers#22732, #25629). The weights
  were trained with ``[ENC]``, so it is used whenever the tokenizer has that token (the tiny
  checkpoint does); otherwise transformers' behaviour is kept and a warning logged at load.
* BLIP's attention is eager (``_supports_sdpa`` is False), text and vision alike. With
  ``attention="sdpa"`` (IMGQ_ATTENTION, the default) the vision encoder's self-attention runs
  through ``scaled_dot_product_attention`` instead (``imgq.worker.attention``): 2.2x the images/s
  of eager on an H200 in bf16. The text encoder stays eager (texts are short).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from imgq import errors
from imgq.worker.attention import Attention, install_vision_sdpa
from imgq.worker.loading import BlipBase

logger = logging.getLogger(__name__)

_ENC = "[ENC]"


class RetrievalModel(BlipBase):
    """A BLIP retrieval checkpoint (hub id or local directory); loads on first use.

    ``embed_images``/``embed_texts`` give L2-normalised ITC features (cosine = dot product);
    ``match`` gives the ITM head's match probability and that cosine for image-text pairs."""

    model_class = BlipForImageTextRetrieval
    kind = "retrieval model"
    hint = (
        "Set IMGQ_EMBED_MODEL to a local checkpoint directory "
        "(e.g. one written by `imgq dev tiny-model --kind retrieval DIR`)."
    )
    required_weights = ("vision_proj", "text_proj", "itm_head")

    _enc_id: int | None = None
    attention: Attention = "sdpa"

    def __init__(self, name_or_path: str, *, attention: Attention = "sdpa", **kwargs: Any) -> None:
        super().__init__(name_or_path, **kwargs)
        self.attention = attention
    # A fast tokenizer rewrites its Rust-side padding/truncation settings on calls that change them,
    # so concurrent calls undo each other's padding (seen here: a ragged batch, "Unable to create
    # tensor"): tokenise one batch at a time (one lock for every instance; a batch takes ~1 ms).
    _tokenizer_lock = threading.Lock()

    def _on_loaded(self, model: Any) -> None:
        if self.attention == "sdpa":
            install_vision_sdpa(model.vision_model)
        assert self._processor is not None  # not self.tokenizer: that would load() again, under the lock
        tokenizer = self._processor.tokenizer
        enc = tokenizer.convert_tokens_to_ids(_ENC)
        vocab = model.text_encoder.get_input_embeddings().num_embeddings
        if isinstance(enc, int) and enc != tokenizer.unk_token_id and 0 <= enc < vocab:
            self._enc_id = enc
        else:
            logger.warning(
                "retrieval tokenizer has no [ENC] token: ITM runs on [CLS], as transformers does",
                extra={"action": "itm_without_enc", "model": self.name},
            )

    # -- properties -----------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Width of the image and text embeddings (``image_text_hidden_size``; 256 for BLIP-base)."""
        self.load()
        return int(self._model.vision_proj.out_features)

    @property
    def max_text_tokens(self) -> int:
        """The longest text, in tokens with [CLS] and [SEP], that the text encoder has positions for."""
        self.load()
        return int(self._model.config.text_config.max_position_embeddings)

    # -- inference -------------------------------------------------------------------------------

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, dim) float32, unit norm, for a (B, 3, H, W) batch: uint8 pixels, or float32 already
        normalised."""
        self.load()
        self.check_pixels(pixel_values)
        if not len(pixel_values):
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            _, feats = self._vision(self.model_input(pixel_values))
        return feats.cpu().numpy()

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(B, dim) float32, unit norm: the unimodal text encoder's [CLS] through ``text_proj``."""
        self.load()
        with torch.inference_mode():
            ids, mask = self._tokenize(texts)
            feats = self._text(ids, mask)
        return feats.cpu().numpy()

    def embed_query(self, text: str) -> np.ndarray:
        """A search text's (dim,) vector. A text the encoder cannot take (over its token positions:
        punctuation and CJK characters are a token each) is the asker's ``search_error``, not a bug."""
        try:
            return self.embed_texts([text])[0]
        except ValueError as exc:
            raise errors.SearchError(f"the search text cannot be encoded: {exc}") from None

    def match(self, pixel_values: np.ndarray, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each pair (image i, text i): the ITM match probability and the ITC cosine, both (B,)
        float32. The vision encoder runs once and serves both heads."""
        self.load()
        self.check_pixels(pixel_values)
        if len(pixel_values) != len(texts):
            raise ValueError(f"{len(pixel_values)} images but {len(texts)} texts: match() takes pairs")
        with torch.inference_mode():
            hidden, image_feats = self._vision(self.model_input(pixel_values))
            ids, mask = self._tokenize(texts)
            cosine = (image_feats * self._text(ids, mask)).sum(dim=-1)
            itm_ids = ids.clone()
            if self._enc_id is not None:
                itm_ids[:, 0] = self._enc_id
            # Every image token is real, so the cross-attention needs no mask (the same as
            # transformers' all-ones encoder_attention_mask).
            grounded = self._model.text_encoder(
                input_ids=itm_ids, attention_mask=mask, encoder_hidden_states=hidden
            ).last_hidden_state
            logits = self._model.itm_head(grounded[:, 0]).float()
            prob = logits.softmax(dim=-1)[:, 1]
        return prob.cpu().numpy(), cosine.cpu().numpy()

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including [CLS] and [SEP], untruncated: compare with ``max_text_tokens``."""
        if not texts:
            return []
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    # -- internals ---------------------------------------------------------------------------------

    def _vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision encoder's last hidden state (B, N, D) and the normalised image features."""
        hidden = self._model.vision_model(pixel_values=pixels).last_hidden_state
        # Normalised in float32: a bf16 norm would cost ~3 significant digits of the cosine.
        return hidden, F.normalize(self._model.vision_proj(hidden[:, 0]).float(), dim=-1)

    def _text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self._model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(self._model.text_proj(hidden[:, 0]).float(), dim=-1)

    def _tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        if not texts:
            raise ValueError("no texts to embed")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError("every text must be a non-blank string")
        # Right padding with an attention mask: positions are absolute, so a padded text's real
        # tokens see exactly what they would alone, and [CLS] never attends to [PAD].
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            encoded = tokenizer(list(texts), padding=True, truncation=False, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if ids.shape[1] > self.max_text_tokens:
            longest = int(mask.sum(dim=1).max())
            raise ValueError(f"a text has {longest} tokens; the text encoder takes at most {self.max_text_tokens}")
        return ids.to(self.device), mask.to(self.device)
