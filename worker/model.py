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
* Explanations: ``BlipTextSelfAttention.forward`` (eager, hard-coded) always returns its attention
  probabilities, so a forward hook on each decoder layer's cross-attention reads them inside the
  batched ``generate`` without ``output_attentions`` (which would also record every self-attention)
  and without a second pass. The hook keeps only the last query position of each step (the one whose
  logits choose the next token), reduced over heads, on the device until ``generate`` returns.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from transformers import BlipForConditionalGeneration

from imgq import errors
from imgq.contract import CaptionParams
from imgq.worker.attention import Attention, install_text_sdpa, install_vision_sdpa
from imgq.worker.decode_loop import DecodeLoop, StaticGreedy, supported
from imgq.worker.loading import BlipBase

# torch's sampling RNG is process-global: a seeded batch must not interleave with another
# sampling batch, or neither is reproducible.
_RNG_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class TokenAttention:
    """One image's generated sequence and the cross-attention behind each generated position."""

    ids: np.ndarray  # (T,) the whole sequence: bos, prompt tokens, then the generated ones
    prompt_len: int  # positions given to generate: the bos token and the prompt's tokens
    # (T - prompt_len, layers, 1 + patches): head-reduced maps, per layer, of the step that chose
    # each generated position; NaN where a beam had ended (those positions are padding).
    maps: np.ndarray


class _CrossAttentionCapture:
    """Forward hooks on the decoder's cross-attention modules, for the calling thread only (the
    model object may be shared; another thread's generate is left alone)."""

    def __init__(self, model: Any, heads: Literal["mean", "max"]) -> None:
        self.modules = [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer
                        if hasattr(layer, "crossattention")]
        if not self.modules:
            raise ValueError("the text decoder has no cross-attention layers")
        self.heads = heads
        self.steps: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self._thread = threading.get_ident()

    def _hook(self, index: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            if threading.get_ident() != self._thread:
                return
            # (rows, heads, keys): the query that picks the next token; reduced in float32, not bf16.
            probs = output[1][:, :, -1, :].float()
            self.steps[index].append(probs.mean(dim=1) if self.heads == "mean" else probs.amax(dim=1))

        return hook

    @contextmanager
    def active(self) -> Iterator[_CrossAttentionCapture]:
        handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def stacked(self) -> torch.Tensor:
        """(steps, layers, rows, keys) on the CPU; one copy from the device."""
        counts = {len(steps) for steps in self.steps}
        if len(counts) != 1:
            raise RuntimeError(f"cross-attention layers saw different numbers of steps: {sorted(counts)}")
        return torch.stack([torch.stack(steps) for steps in self.steps], dim=1).cpu()


class CaptionModel(BlipBase):
    """A BLIP captioning checkpoint (hub id or local directory); loads on first use."""

    model_class = BlipForConditionalGeneration
    kind = "caption model"
    hint = "Set IMGQ_CAPTION_MODEL to a local checkpoint directory (e.g. one written by `imgq dev tiny-model DIR`)."
    attention: Attention = "sdpa"

    def __init__(self, name_or_path: str, *, attention: Attention = "sdpa",
                 decode_loop: DecodeLoop = "static", **kwargs: Any) -> None:
        super().__init__(name_or_path, **kwargs)
        self.attention = attention
        self.decode_loop = decode_loop
        self._static: StaticGreedy | None = None
        # Decoder positions of each prompt seen: every item of a job checks the same one, on decode
        # threads (one tokenizer call per prompt, not per item).
        self._prompt_positions: dict[str, int] = {}
        self._prompt_lock = threading.Lock()

    def _on_loaded(self, model: Any) -> None:
        if self.attention == "sdpa":
            # Vision self-attention, and the decoder's self- and cross-attention; an explained
            # caption's hooked cross-attention modules still run eager (imgq.worker.attention).
            install_vision_sdpa(model.vision_model)
            install_text_sdpa(model.text_decoder)
        if self.decode_loop != "generate":
            # Off a GPU, graphs would be the same fixed shapes without a capture: no gain, so static.
            graphs = self.decode_loop == "graphs" and str(self.device).startswith("cuda")
            self._static = StaticGreedy(model, graphs=graphs)

    # -- inference -------------------------------------------------------------------------------

    def generate_ids(self, pixel_values: np.ndarray, params: CaptionParams) -> torch.Tensor:
        """Token ids (B, T) on the CPU: the bos token, the prompt tokens if any, then the caption."""
        return self._generate(pixel_values, params)[0]

    def _generate(
        self, pixel_values: np.ndarray, params: CaptionParams, capture: _CrossAttentionCapture | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(ids on the CPU, beam indices or None, prompt length); with ``capture``, its hooks run
        inside this very generate."""
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
        prompt_len = 1  # BLIP's generate starts from the bos token alone
        if params.prompt is not None:
            # Tokenised once and repeated: every image in the batch continues the same prompt.
            ids = self.tokenizer(params.prompt, return_tensors="pt").input_ids.to(self.device)
            kwargs["input_ids"] = ids.repeat(batch, 1)
            kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
            prompt_len = ids.shape[1] - 1  # generate drops the trailing [SEP]
        if self._static is not None and capture is None and not self._static.hooked():
            why_not = supported(self._model.generation_config, num_beams=params.num_beams,
                                do_sample=params.do_sample, repetition_penalty=params.repetition_penalty)
            if why_not is None:
                return self._generate_static(pixels, kwargs.get("input_ids"), params), None, prompt_len
        if capture is not None and params.num_beams > 1:
            # Only for beam_indices: which running beam chose each token of the returned sequence.
            kwargs["return_dict_in_generate"] = True

        with torch.inference_mode(), (capture.active() if capture is not None else _nothing()):
            if not params.do_sample:
                out = self._model.generate(pixel_values=pixels, **kwargs)
            else:
                # The process's RNG is left as it was either way; without a seed each call draws a
                # fresh one (restoring the RNG alone would make every unseeded call draw the same).
                with _RNG_LOCK, torch.random.fork_rng(devices=self._rng_devices()):
                    torch.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
                    out = self._model.generate(pixel_values=pixels, **kwargs)
        if isinstance(out, torch.Tensor):
            return out.cpu(), None, prompt_len
        beams = getattr(out, "beam_indices", None)
        return out.sequences.cpu(), None if beams is None else beams.cpu(), prompt_len

    def check_prompt(self, params: CaptionParams) -> None:
        """Refuse (the item's ``prompt_too_long``) a prompt whose tokens and ``max_new_tokens`` do
        not fit the decoder's positions: generate would fail the whole batch on an index error.
        The producer's bound counts words; punctuation and CJK characters are a token each."""
        if params.prompt is None:
            return
        self.load()
        assert self._model is not None
        positions = int(self._model.config.text_config.max_position_embeddings)
        with self._prompt_lock:
            prompt = self._prompt_positions.get(params.prompt)
            if prompt is None:
                if len(self._prompt_positions) >= 4096:  # a bound, not a policy: any prompt may return
                    self._prompt_positions.clear()
                # generate drops the trailing [SEP] and starts from the bos token in [CLS]'s place.
                prompt = self._prompt_positions[params.prompt] = len(self.tokenizer(params.prompt).input_ids) - 1
        if prompt + params.max_new_tokens > positions:
            raise errors.PromptTooLong(f"the prompt takes {prompt} text positions (its tokens and the start token); "
                                       f"with max_new_tokens {params.max_new_tokens} that exceeds the model's "
                                       f"{positions}")

    def _generate_static(self, pixels: torch.Tensor, prompt_ids: torch.Tensor | None,
                         params: CaptionParams) -> torch.Tensor:
        """Greedy ids through :class:`StaticGreedy`, from the same start as BLIP's ``generate``:
        the bos token, then the prompt's tokens without their trailing [SEP]."""
        assert self._model is not None and self._static is not None
        text = self._model.config.text_config
        if prompt_ids is None:
            ids = torch.full((len(pixels), 1), text.bos_token_id, dtype=torch.long, device=self.device)
        else:
            ids = prompt_ids[:, :-1].clone()
            ids[:, 0] = text.bos_token_id
        with torch.inference_mode():
            image_embeds = self._model.vision_model(pixel_values=pixels)[0]
            out = self._static.generate(image_embeds, ids, params.max_new_tokens, params.min_new_tokens)
        return out.cpu()

    def explain(
        self, pixel_values: np.ndarray, params: CaptionParams, heads: Literal["mean", "max"] = "mean"
    ) -> tuple[list[str], list[TokenAttention]]:
        """Captions, exactly as :meth:`caption` returns them, and each image's cross-attention per
        generated token, captured inside the same batched ``generate``."""
        self.load()
        capture = _CrossAttentionCapture(self._model, heads)
        ids, beams, prompt_len = self._generate(pixel_values, params, capture)
        steps = capture.stacked()  # (S, L, rows, K); rows = batch, or batch * num_beams
        generated = ids.shape[1] - prompt_len
        if steps.shape[0] < generated:
            raise RuntimeError(f"captured {steps.shape[0]} decoding steps for {generated} generated tokens")
        out: list[TokenAttention] = []
        step = torch.arange(generated)
        for b in range(ids.shape[0]):
            # Greedy and sampling keep row b; beam search says which running beam chose each token.
            rows = torch.full((generated,), b) if beams is None else beams[b, :generated].long()
            maps = steps[step, :, rows.clamp(min=0), :]  # (generated, layers, keys)
            maps[rows < 0] = float("nan")  # beam search marks positions past this beam's end with -1
            out.append(TokenAttention(ids[b].numpy(), prompt_len, maps.numpy()))
        return self._texts(ids), out

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of the ViT patch grid, from the checkpoint's vision config."""
        self.load()
        vision = self._model.config.vision_config
        return vision.image_size // vision.patch_size, vision.image_size // vision.patch_size

    @property
    def eos_token_id(self) -> int | None:
        """The token that ends a caption: BLIP's generate stops on the text config's [SEP]."""
        self.load()
        sep = self._model.config.text_config.sep_token_id
        return None if sep is None else int(sep)

    @property
    def decoder_shape(self) -> dict[str, Any]:
        """What the checkpoint's text decoder is, from its config (documented in the README)."""
        self.load()
        text = self._model.config.text_config
        vision = self._model.config.vision_config
        layers = self._model.text_decoder.bert.encoder.layer
        return {
            "architecture": type(self._model.text_decoder).__name__,
            "layers": int(text.num_hidden_layers),
            "cross_attention_layers": sum(hasattr(layer, "crossattention") for layer in layers),
            "heads": int(text.num_attention_heads),
            "hidden_size": int(text.hidden_size),
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
        }

    def _texts(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def caption(self, pixel_values: np.ndarray, params: CaptionParams) -> list[str]:
        """One caption per image of a (B, 3, H, W) batch: uint8 pixels, or float32 already normalised."""
        return self._texts(self.generate_ids(pixel_values, params))

    def _rng_devices(self) -> list[int]:
        if self.device.startswith("cuda"):
            return [torch.device(self.device).index or torch.cuda.current_device()]
        return []


@contextmanager
def _nothing() -> Iterator[None]:
    yield
