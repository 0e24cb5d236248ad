"""``imgq finetune``: train a per-language LoRA adapter (:mod:`imgq.worker.lora`'s layout) on the caption
model's text decoder from (image, caption) pairs, with checkpoints, resume and a held-out report.

Invariants:

* The images go through the worker's own path: :class:`~imgq.worker.fetch.Fetcher` (IMGQ_ALLOWED_BUCKETS /
  IMGQ_LOCAL_ROOTS confinement), :func:`~imgq.worker.decode.decode`, the model's
  :class:`~imgq.worker.preprocess.Preprocessor` and ``CaptionModel.model_input``: an adapter sees at training
  exactly the pixels it will see in a job.
* The vision encoder is frozen and never adapted, so each image's features are computed once and cached in
  ``ADAPTER_DIR/features.pt`` (keyed by the base model's revision, the resize mode and each image's content
  hash); a resumed run reuses them.
* Training starts from ``[DEC]`` (BLIP's generate overwrites the first token with it) and ends at ``[SEP]``
  (where generate stops); the loss is the plain token cross-entropy (transformers' BLIP loss adds label
  smoothing 0.1, which would hide how well the captions are fitted).
* Deterministic for a seed: the split, the LoRA init and each epoch's order come from the seed; a checkpoint
  (``ADAPTER_DIR/checkpoint.pt``, written atomically after every epoch) holds the adapter, the optimizer,
  the epoch, the history and torch's RNG, so a resumed run continues exactly where it stopped. It also
  holds the settings that shape the run; resuming with different ones is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgq import errors

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FEATURES = "features.pt"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_HEADER = ("ref", "caption")
# peft (get_peft_model) reads `is_gradient_checkpointing`, which transformers 5 deprecated.
PEFT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


@dataclass(frozen=True)
class FinetuneOptions:
    pairs: Path
    out: Path
    lang: str
    name: str
    epochs: int = 10
    rank: int = 8
    lr: float = 1e-3
    holdout: float = 0.25
    batch: int = 16
    seed: int = 0
    resize: str = "stretch"
    max_new_tokens: int = 30  # of the held-out greedy captions

    @property
    def alpha(self) -> int:
        return 2 * self.rank  # scaling alpha/r = 2, as imgq.worker.lora's defaults (8, 16)


@dataclass
class FinetuneReport:
    name: str
    epochs: int
    train_pairs: int
    heldout_pairs: int
    train_loss_initial: float  # on the training pairs, before the first step
    train_loss_final: float  # on the training pairs, after the last epoch
    heldout_loss: float | None
    chrf: float | None  # held-out greedy captions vs the references as written
    chrf_tokenizable: float | None  # vs the references as the tokenizer can write them (lower case, no accents)
    revision: str = ""  # hex SHA-256 of adapter_model.safetensors
    config_sha256: str = ""  # hex SHA-256 of adapter_config.json (registered beside the revision, migration 0016)
    history: list[float] = field(default_factory=list)  # mean training loss of each epoch
    resumed_from: int = 0

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("name", "revision", "config_sha256")}

    def summary(self) -> str:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4g}"

        factor = self.train_loss_initial / self.train_loss_final if self.train_loss_final > 0 else math.inf
        resumed = f" (resumed at epoch {self.resumed_from})" if self.resumed_from else ""
        return (f"finetune {self.name}: epochs={self.epochs}{resumed} train_pairs={self.train_pairs} "
                f"train_loss first={fmt(self.train_loss_initial)} last={fmt(self.train_loss_final)} "
                f"({factor:.1f}x lower) heldout_pairs={self.heldout_pairs} heldout_loss={fmt(self.heldout_loss)} "
                f"chrF={fmt(self.chrf)} chrF_tokenizable={fmt(self.chrf_tokenizable)} revision={self.revision[:16]}")


# -- inputs -----------------------------------------------------------------------------------------------------

class PairsFileError(errors.InvalidRequest):
    """The pairs file cannot be read (missing, unreadable, not UTF-8): ``bad_file``, as for ``imgq enqueue``."""

    code = "bad_file"


class BadPairsRow(errors.BadParams):
    """A row of the pairs file is malformed: ``bad_pairs`` with the file and line, as ``imgq enqueue`` names
    a bad row of a validate job's pairs (a BadParams still, for callers that catch those)."""

    code = "bad_pairs"


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """``ref,caption`` rows (UTF-8 CSV; a first row ``ref,caption`` is a header and skipped). A caption with
    commas is quoted as CSV quotes it. An unreadable file is a :class:`PairsFileError` (``bad_file``), a
    malformed row or a file without pairs a :class:`BadPairsRow` (``bad_pairs``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise PairsFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PairsFileError(f"cannot read {path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start})") from None
    pairs: list[tuple[str, str]] = []
    reader = csv.reader(io.StringIO(text))
    try:
        for index, row in enumerate(reader):
            number = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if index == 0 and tuple(cell.strip().lower() for cell in row) == _HEADER:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise BadPairsRow(f"{path}:{number}: expected two non-empty columns ref,caption, "
                                  f"got {str(row)[:200]}")
            pairs.append((row[0].strip(), row[1].strip()))
    except csv.Error as exc:  # a field over csv's limit (128 KiB), an unclosed quote at the end
        raise BadPairsRow(f"{path}:{reader.line_num}: not CSV imgq can read: {exc}") from None
    if not pairs:
        raise BadPairsRow(f"{path} holds no ref,caption pairs")
    return pairs


def split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle; at least one of each when holdout > 0 and n >= 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = 0 if holdout <= 0 or n < 2 else min(n - 1, max(1, round(n * holdout)))
    return sorted(order[k:]), sorted(order[:k])


def _pixels(settings: Any, model: Any, refs: list[str], resize: str) -> tuple[np.ndarray, list[str]]:
    """uint8 (or letterbox float32) model inputs of ``refs`` and each one's content hash, as a worker makes them."""
    from imgq.worker.decode import decode, draft_target
    from imgq.worker.fetch import Fetcher
    from imgq.worker.preprocess import Preprocessor

    fetcher = Fetcher(settings)
    pre = Preprocessor.from_image_processor(model.image_processor)
    target = draft_target([pre.size], settings.draft_decode)
    rows, hashes = [], []
    for ref in refs:
        try:
            blob = fetcher.fetch(ref)
            image = decode(blob.data, max_pixels=settings.max_pixels, target=target)
        except errors.ImgqError as exc:
            raise errors.BadParams(f"{ref}: {exc.message} ({exc.code})") from None
        rows.append(pre.pixels(image.image, resize))  # type: ignore[arg-type]
        hashes.append(hashlib.sha256(blob.data).hexdigest())
    return np.stack(rows), hashes


# -- the trainer ----------------------------------------------------------------------------------------------

class Trainer:
    """One run of ``imgq finetune`` on a loaded :class:`~imgq.worker.model.CaptionModel`."""

    def __init__(self, settings: Any, model: Any, options: FinetuneOptions) -> None:
        self.settings = settings
        self.model = model
        self.opt = options
        self.out = options.out

    # fingerprint of what shapes the run: a resumed run must match it
    def fingerprint(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        digest = hashlib.sha256("\n".join(f"{r}\t{c}" for r, c in pairs).encode()).hexdigest()
        o = self.opt
        return {"base_model": self.model.name, "base_revision": self.model.revision, "pairs_sha256": digest,
                "rank": o.rank, "alpha": o.alpha, "lr": o.lr, "holdout": o.holdout, "batch": o.batch, "seed": o.seed,
                "resize": o.resize, "lang": o.lang}

    def features(self, refs: list[str]) -> tuple[np.ndarray, torch.Tensor]:
        """Every ref's model input and vision-encoder output (N, tokens, hidden); the latter computed once and
        cached in ADAPTER_DIR (fetching and decoding run again: the cache is keyed by the images' content)."""
        path = self.out / FEATURES
        pixels, hashes = _pixels(self.settings, self.model, refs, self.opt.resize)
        key = {"base_revision": self.model.revision, "resize": self.opt.resize, "images": hashes}
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return pixels, cached["features"].to(self.model.device)
        vision = self.model._model.vision_model
        chunks = []
        with torch.no_grad():  # not inference_mode: its tensors could not take part in training
            for start in range(0, len(pixels), 32):
                chunks.append(vision(pixel_values=self.model.model_input(pixels[start:start + 32]))[0].float().cpu())
        feats = torch.cat(chunks)
        _atomic_save({"key": key, "features": feats}, path)
        return pixels, feats.to(self.model.device)

    def tokens(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids starting with [DEC] and ending with [SEP], attention mask)."""
        tok = self.model.tokenizer
        enc = tok(captions, padding=True, truncation=True, max_length=64, return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = self.model._model.config.text_config.bos_token_id
        return ids.to(self.model.device), enc.attention_mask.to(self.model.device)

    def loss(self, decoder: Any, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of predicting ids[1:] (up to and including [SEP]) from the image."""
        logits = decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=feats.to(self.model.dtype),
                         use_cache=False, return_dict=True).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)

    def mean_loss(self, decoder: Any, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for rows in _batches(len(ids), self.opt.batch):
                n = int(mask[rows, 1:].sum())
                total += float(self.loss(decoder, feats[rows], ids[rows], mask[rows])) * n
                count += n
        return total / max(count, 1)

    def run(self, pairs: list[tuple[str, str]], *, resume: bool,
            progress: Callable[[int, int, float], Any] | None = None) -> FinetuneReport:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        from imgq.worker.lora import lora_config

        o = self.opt
        self.out.mkdir(parents=True, exist_ok=True)
        fingerprint = self.fingerprint(pairs)
        ckpt_path = self.out / CHECKPOINT
        state: dict[str, Any] | None = None
        if resume:
            if not ckpt_path.is_file():
                raise errors.BadParams(f"--resume: {self.out} has no checkpoint ({CHECKPOINT}); run without --resume")
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            differ = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
            if differ:
                was = ", ".join(f"{k}={state['fingerprint'].get(k)!r}" for k in differ)
                raise errors.BadParams(f"--resume: the checkpoint in {self.out} was made with other settings ({was}); "
                                       "resume with those, or start afresh in another --out")
            if state["epoch"] > o.epochs:
                raise errors.BadParams(f"--resume: the checkpoint is at epoch {state['epoch']}, past --epochs "
                                       f"{o.epochs}")
        elif ckpt_path.is_file():
            done = torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"]
            raise errors.BadParams(f"{self.out} already holds a checkpoint at epoch {done}: pass --resume to continue "
                                   "it, or choose another --out")

        refs = [r for r, _ in pairs]
        captions = [c for _, c in pairs]
        pixels, feats = self.features(refs)
        ids, mask = self.tokens(captions)
        train, held = split(len(pairs), o.holdout, o.seed)

        torch.manual_seed(o.seed)  # the LoRA init (A random, B zero): the same for every run of a seed
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecated: not the user's to fix
            warnings.filterwarnings("ignore", PEFT_CHECKPOINTING_WARNING, FutureWarning)
            peft_model = get_peft_model(self.model._model, lora_config(o.rank, o.alpha, 0.0))
        decoder = self.model._model.text_decoder
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=o.lr)
        history: list[float] = []
        start = 0
        if state is not None:
            set_peft_model_state_dict(peft_model, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            history = list(state["history"])
            start = int(state["epoch"])
            initial = float(state["initial"])
            torch.set_rng_state(state["torch_rng"])
        else:
            peft_model.eval()
            initial = self.mean_loss(decoder, feats[train], ids[train], mask[train])

        steps_per_epoch = len(_batches(len(train), o.batch))
        for epoch in range(start, o.epochs):
            peft_model.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(o.seed * 100_003 + epoch))
            losses = []
            for step, rows in enumerate(_batches(len(train), o.batch)):
                pick = [train[i] for i in order[rows].tolist()]
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(decoder, feats[pick], ids[pick], mask[pick])
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(epoch * steps_per_epoch + step + 1, epoch + 1, losses[-1])
            history.append(sum(losses) / len(losses))
            _atomic_save({"epoch": epoch + 1, "fingerprint": fingerprint, "history": history, "initial": initial,
                          "lora": get_peft_model_state_dict(peft_model), "optimizer": optimizer.state_dict(),
                          "torch_rng": torch.get_rng_state()}, ckpt_path)

        peft_model.eval()
        final = self.mean_loss(decoder, feats[train], ids[train], mask[train])
        report = FinetuneReport(o.name, o.epochs, len(train), len(held), initial, final, None, None, None,
                                history=history, resumed_from=start if state is not None else 0)
        if held:
            report.heldout_loss = self.mean_loss(decoder, feats[held], ids[held], mask[held])
            hyps = self.captions(pixels[held])
            refs_written = [captions[i] for i in held]
            refs_tokenizable = [self.model.tokenizer.decode(self.model.tokenizer(c).input_ids, skip_special_tokens=True)
                                for c in refs_written]
            report.chrf = chrf(hyps, refs_written)
            report.chrf_tokenizable = chrf(hyps, refs_tokenizable)
        peft_model.save_pretrained(str(self.out))
        report.revision = hashlib.sha256((self.out / WEIGHTS_FILE).read_bytes()).hexdigest()
        report.config_sha256 = hashlib.sha256((self.out / CONFIG_FILE).read_bytes()).hexdigest()
        return report

    def captions(self, pixels: np.ndarray) -> list[str]:
        """Greedy captions with the adapter being trained, through ``CaptionModel.caption`` itself."""
        from imgq.contract import CaptionParams

        params = CaptionParams(max_new_tokens=self.opt.max_new_tokens)
        return [text for start in range(0, len(pixels), 32)
                for text in self.model.caption(pixels[start:start + 32], params)]


def chrf(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hyps, [refs]).score)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def iter_pairs_warnings(model: Any, pairs: list[tuple[str, str]]) -> Iterator[str]:
    """What the tokenizer cannot write: captions with [UNK] tokens, and ones that lose case or accents."""
    tok = model.tokenizer
    unk = lossy = 0
    for _, caption in pairs:
        ids = tok(caption).input_ids
        if tok.unk_token_id in ids:
            unk += 1
        elif "".join(tok.decode(ids, skip_special_tokens=True).split()) != "".join(caption.split()):
            lossy += 1  # spacing aside (WordPiece decodes "dog," as "dog ,"): case or accents lost
    if unk:
        yield (f"{unk} of {len(pairs)} captions hold characters the tokenizer cannot write ([UNK]); the adapter "
               "cannot learn them (README, 'Captions in other languages')")
    if lossy:
        yield (f"{lossy} of {len(pairs)} captions change through the tokenizer (lower case, accents stripped); "
               "captions come out as the tokenizer writes them")
