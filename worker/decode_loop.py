"""Greedy captioning with a static key/value cache: BLIP's text decoder driven step by step here
instead of through transformers' ``generate``, and on CUDA each step replayed as a CUDA graph.

Why: on a GPU, greedy decoding is 20 small steps per caption, each a few hundred kernel launches
plus ``generate``'s Python (logits processors, cache bookkeeping, a host sync per step). GPU run 1
measured 23-71 % utilisation for captioning. A static cache (keys and values written in place into
buffers sized for the whole caption) makes every step the same shapes, which is what a CUDA graph
needs: one replay launches the whole step.

What it computes is ``generate``'s greedy search, op for op on the decoder's own modules (their
``query``/``key``/``value`` projections, output blocks, feed-forward and LM head, so LoRA layers
still apply): the bos token and the prompt are one causal prefill, each later step attends to the
cache up to its position and to the image's keys and values (computed once), ``min_new_tokens``
masks [SEP] as transformers' ``MinNewTokensLengthLogitsProcessor`` does, finished rows get
[PAD] and the output stops at the step where every row has finished. Anything else a generation
config or the parameters could ask for (beams, sampling, a repetition penalty, other logits
processors) is not here: :func:`supported` says so and the caller keeps ``generate``.

``static`` slices the cache to the filled length, so it is the same computation as ``generate``
with ``IMGQ_ATTENTION=sdpa`` (tests/unit/test_decode_loop.py compares ids). ``graphs`` keeps every
shape fixed instead: the whole cache with its unfilled tail masked, the position a device tensor
the step advances itself. Off CUDA that step runs without a capture, which is how the tests check
it against ``generate``; the capture itself has not run yet. It is measured side by side in
``bench/gpu_run.sh`` (variant ``sdpa+graphs``) and stays opt-in until a GPU run has shown it
equal and faster.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DecodeLoop = Literal["generate", "static", "graphs"]

# Generation-config fields that add a logits processor or change the search when set; the loop
# implements none of them.
_UNSUPPORTED = {
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "encoder_repetition_penalty": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "guidance_scale": (None, 1.0),
    "renormalize_logits": (None, False),
    "watermarking_config": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "num_beam_groups": (None, 1),
}


def supported(generation_config: Any, *, num_beams: int, do_sample: bool, repetition_penalty: float) -> str | None:
    """None when the loop computes what ``generate`` would; else why not (logged by the caller)."""
    if num_beams != 1 or do_sample:
        return "beam search and sampling run through generate"
    if repetition_penalty != 1.0:
        return "a repetition penalty runs through generate"
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(generation_config, name, None)
        if value not in neutral:
            return f"the checkpoint's generation config sets {name}"
    return None


@dataclass
class _Graph:
    """One captured step for a batch size and cache length, with the buffers it reads and writes."""

    replay: Any  # the captured step's replay; off CUDA (tests) the step itself
    token: torch.Tensor  # (B, 1) the token the step consumes
    pos: torch.Tensor  # (1,) its position; the step advances it
    min_end: torch.Tensor  # (1,) prompt length + min_new_tokens: [SEP] is masked before it
    finished: torch.Tensor  # (B,) bool
    out: torch.Tensor  # (B, T) every token so far
    keys: list[torch.Tensor]  # per layer (B, H, T, D)
    values: list[torch.Tensor]
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # per layer the image's keys and values


class StaticGreedy:
    """Greedy decoding of a loaded ``BlipForConditionalGeneration`` with a static cache."""

    def __init__(self, model: Any, *, graphs: bool = False) -> None:
        decoder = model.text_decoder
        self.graphs = graphs
        self.embeddings = decoder.bert.embeddings
        self.layers = list(decoder.bert.encoder.layer)
        self.head = decoder.cls
        text = model.config.text_config
        self.heads = text.num_attention_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.eos = int(text.sep_token_id)
        self.pad = int(text.pad_token_id)
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool: Any = None
        # A graph's buffers are shared by every call of its shape: one graphed call at a time.
        self._graph_lock = threading.Lock()
        self.graphs_off: str | None = None  # why CUDA graphs are not used, once a capture failed

    def hooked(self) -> bool:
        """True when a forward hook sits on one of the decoder's attention modules: the loop calls
        their projections, not their ``forward``, so such a hook (what explained captions use to
        read the probabilities) would never fire; the caller keeps ``generate`` then."""
        return any(layer.attention.self._forward_hooks or layer.crossattention.self._forward_hooks
                   for layer in self.layers)

    def tuned(self) -> bool:
        """True once adapters (PEFT LoRA layers) sit in the decoder: their per-row routing is Python
        that runs at each call, which a graph replay would skip, replaying whatever adapters (or
        none) were active when it was captured. Such a model keeps the static loop, ungraphed."""
        return any(hasattr(module, "lora_A") for layer in self.layers for module in layer.modules())

    # -- one decoder pass -------------------------------------------------------------------------

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def cross_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys and values of the image: computed once per batch."""
        out = []
        for layer in self.layers:
            attn = layer.crossattention.self
            out.append((self._split(attn.key(image_embeds)), self._split(attn.value(image_embeds))))
        return out

    def _pass(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor],
              values: list[torch.Tensor], cross: list[tuple[torch.Tensor, torch.Tensor]],
              write: Any, read: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, vocab) of the last of ``ids`` (B, T) at ``positions``; ``write(cache, new)``
        stores the step's keys or values, ``read(cache)`` gives what it attends to."""
        emb = self.embeddings
        hidden = emb.word_embeddings(ids) + emb.position_embeddings(positions)
        hidden = emb.dropout(emb.LayerNorm(hidden))
        for i, layer in enumerate(self.layers):
            attn = layer.attention.self
            q = self._split(attn.query(hidden))
            write(keys[i], self._split(attn.key(hidden)))
            write(values[i], self._split(attn.value(hidden)))
            ctx = F.scaled_dot_product_attention(q, read(keys[i]), read(values[i]), attn_mask=mask, scale=self.scale)
            hidden = layer.attention.output(self._merge(ctx), hidden)
            xattn = layer.crossattention.self
            ck, cv = cross[i]
            ctx = F.scaled_dot_product_attention(self._split(xattn.query(hidden)), ck, cv, scale=self.scale)
            hidden = layer.crossattention.output(self._merge(ctx), hidden)
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.head(hidden[:, -1:])[:, -1]

    def _select(self, logits: torch.Tensor, generated: torch.Tensor, min_new: torch.Tensor,
                finished: torch.Tensor) -> torch.Tensor:
        """generate's greedy choice: float32 scores, [SEP] at -inf while ``generated < min_new``
        (both counted from the same origin: new tokens, or positions for the graphed step), argmax,
        [PAD] for rows already finished."""
        scores = logits.float()
        scores[:, self.eos] = torch.where(generated < min_new, float("-inf"), scores[:, self.eos])
        token = scores.argmax(-1)
        return torch.where(finished, self.pad, token)

    # -- the loop ---------------------------------------------------------------------------------

    def generate(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                 min_new_tokens: int) -> torch.Tensor:
        """(B, P + n) ids: the prompt (bos first), then up to ``max_new_tokens`` greedy tokens,
        ending where every row has finished, as ``generate`` returns them."""
        if self.graphs and self.graphs_off is None and not self.tuned():
            try:
                with self._graph_lock:
                    return self._generate_graphed(image_embeds, input_ids, max_new_tokens, min_new_tokens)
            except Exception as exc:  # capture refused (an op, the driver): keep serving, without graphs
                self.graphs_off = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("CUDA graphs off for the static decode loop (%s)", self.graphs_off,
                            extra={"action": "graphs_off"})
        return self._generate_eager(image_embeds, input_ids, max_new_tokens, min_new_tokens)

    def _prefill(self, ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 cross: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The bos token and the prompt, causally, into cache positions [0, P); the last one's logits."""
        prompt = ids.shape[1]
        positions = torch.arange(prompt, device=ids.device).unsqueeze(0)
        mask = None
        if prompt > 1:
            allowed = torch.ones(prompt, prompt, dtype=torch.bool, device=ids.device).tril()
            mask = torch.zeros(prompt, prompt, dtype=keys[0].dtype, device=ids.device)
            mask.masked_fill_(~allowed, torch.finfo(keys[0].dtype).min)

        def write(cache: torch.Tensor, new: torch.Tensor) -> None:
            cache[:, :, :prompt] = new

        return self._pass(ids, positions, keys, values, cross, write, lambda c: c[:, :, :prompt], mask)

    def _buffers(self, batch: int, total: int, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (batch, self.heads, total, self.head_dim)
        keys = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in self.layers]
        return keys, [torch.zeros_like(k) for k in keys]

    def _generate_eager(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                        min_new_tokens: int) -> torch.Tensor:
        batch, prompt = input_ids.shape
        total = prompt + max_new_tokens
        keys, values = self._buffers(batch, total, image_embeds)
        cross = self.cross_kv(image_embeds)
        logits = self._prefill(input_ids, keys, values, cross)
        device = input_ids.device
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        min_new = torch.tensor(min_new_tokens, device=device)
        # Step numbers and positions made once on the device: no host-to-device copy per step.
        counts = torch.arange(max_new_tokens, device=device)
        positions = torch.arange(total, device=device).view(1, -1)
        tokens = [input_ids]
        for step in range(max_new_tokens):
            token = self._select(logits, counts[step], min_new, finished)
            tokens.append(token[:, None])
            finished = finished | (token == self.eos)
            # Whether every row has ended needs a host sync: asked every 4 steps, as the graphed
            # path does; the steps in between only add [PAD], cut by _trim.
            if step == max_new_tokens - 1 or (step % 4 == 0 and bool(finished.all())):
                break
            pos = prompt + step

            def write(cache: torch.Tensor, new: torch.Tensor, at: int = pos) -> None:
                cache[:, :, at : at + 1] = new

            logits = self._pass(token[:, None], positions[:, pos : pos + 1], keys, values,
                                cross, write, lambda c, end=pos + 1: c[:, :, :end], None)
        return _trim(torch.cat(tokens, dim=1), prompt, self.eos, self.pad)

    def _generate_graphed(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                          min_new_tokens: int) -> torch.Tensor:
        batch, prompt = input_ids.shape
        total = prompt + max_new_tokens
        g = self._graph(batch, total, prompt, image_embeds)
        for (ck, cv), (k, v) in zip(g.cross, self.cross_kv(image_embeds), strict=True):
            ck.copy_(k)
            cv.copy_(v)
        for cache in (*g.keys, *g.values):
            cache.zero_()
        logits = self._prefill(input_ids, g.keys, g.values, g.cross)
        g.finished.zero_()
        g.out.fill_(self.pad)
        g.out[:, :prompt] = input_ids
        g.min_end.fill_(prompt + min_new_tokens)
        first = self._select(logits, torch.zeros((), device=logits.device, dtype=torch.long),
                             torch.tensor(min_new_tokens, device=logits.device), g.finished)
        g.out[:, prompt] = first
        g.finished |= first == self.eos
        g.token.copy_(first[:, None])
        g.pos.fill_(prompt)
        steps = 1
        # Each replay consumes the token at pos, writes the next one at pos + 1 and advances pos.
        # The host looks at ``finished`` every few steps only: a sync per step is what the graph
        # saves; the extra steps after every row has finished only write [PAD], trimmed below.
        while steps < max_new_tokens:
            if steps % 4 == 1 and bool(g.finished.all()):
                break
            g.replay()
            steps += 1
        out = g.out[:, : prompt + steps].clone()
        return _trim(out, prompt, self.eos, self.pad)

    def _graph(self, batch: int, total: int, prompt: int, like: torch.Tensor) -> _Graph:
        key = (batch, total, prompt)
        if key in self._graphs:
            return self._graphs[key]
        device = like.device
        keys, values = self._buffers(batch, total, like)
        cross = list(zip(*self._buffers(batch, like.shape[1], like), strict=True))
        g = _Graph(replay=None, token=torch.zeros(batch, 1, dtype=torch.long, device=device),
                   pos=torch.zeros(1, dtype=torch.long, device=device),
                   min_end=torch.zeros(1, dtype=torch.long, device=device),
                   finished=torch.zeros(batch, dtype=torch.bool, device=device),
                   out=torch.full((batch, total), self.pad, dtype=torch.long, device=device),
                   keys=keys, values=values, cross=cross)
        arange = torch.arange(total, device=device)
        minimum = torch.finfo(like.dtype).min

        def step() -> None:
            mask = torch.where(arange <= g.pos, 0.0, minimum).to(like.dtype).view(1, 1, 1, total)

            def write(cache: torch.Tensor, new: torch.Tensor) -> None:
                cache.index_copy_(2, g.pos, new)

            logits = self._pass(g.token, g.pos.view(1, 1), g.keys, g.values, g.cross, write, lambda c: c, mask)
            # The token lands at pos + 1: counted from the start, [SEP] waits until min_end.
            token = self._select(logits, g.pos + 1, g.min_end, g.finished)
            g.out.index_copy_(1, g.pos + 1, token[:, None])
            g.finished |= token == self.eos
            g.token.copy_(token[:, None])
            g.pos += 1

        if not like.is_cuda:
            # The same buffers, masks and in-place position, stepped without a capture: how the tests
            # check everything but the capture itself on a CPU.
            g.replay = step
            self._graphs[key] = g
            return g
        # Warm up on a side stream (cuBLAS handles, allocator), then capture; the shared pool lets
        # the graphs of several batch sizes reuse one another's memory.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                g.pos.fill_(0)
                step()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        g.pos.fill_(0)
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        g.replay = graph.replay
        self._graphs[key] = g
        return g


def _trim(out: torch.Tensor, prompt: int, eos: int, pad: int) -> torch.Tensor:
    """Cut ``out`` after the step at which every row had finished, as ``generate`` stops there."""
    generated = out[:, prompt:]
    done = (generated == eos).cumsum(1) > 0  # (B, n): finished at or before each step
    all_done = done.all(0).nonzero()
    if len(all_done):
        return out[:, : prompt + int(all_done[0]) + 1]
    return out
