"""Tiny random BLIP checkpoints, captioning and retrieval, for tests and the offline demo (no model
hub needed).

The layout mirrors ``Salesforce/blip-image-captioning-base``: a ``BlipForConditionalGeneration``
with the real 384 px input, a lower-cased BERT WordPiece tokenizer whose ``bos_token`` is
``[DEC]`` (BLIP overwrites the first prompt token with it), and a ``BlipImageProcessor`` with
BLIP's mean/std. The widths, depths and vocabulary are tiny, and so is the compute: 64 px patches
give 37 vision tokens instead of BLIP's 577, because eager attention over 577 tokens made even a
32-wide model cost ~29 ms of CPU per image, which hid the pipeline's own overhead in benchmarks.

The retrieval checkpoint mirrors ``Salesforce/blip-itm-base-coco`` the same way: a
``BlipForImageTextRetrieval`` with the same tokenizer and processor, and BLIP-base's 256-d projections.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipImageProcessorPil,
    BlipProcessor,
    GenerationConfig,
)

from imgq.worker.loading import quiet_bars_off_a_terminal

# Written last: its presence (with matching settings) means the directory is complete.
MARKER = "imgq-tiny.json"
FORMAT = 2  # 2: patch size 64 (was 16), no special tokens generated
PATCH_SIZE = 64
RETRIEVAL_FORMAT = 1
RETRIEVAL_DIM = 256  # BLIP-base's image_text_hidden_size: the embedding index is 256-d
# Init std per top-level module of the retrieval model (others: 0.2). Measured on 32 synthetic
# scenes: a copy re-encoded at JPEG quality 50, or 2% brighter, keeps cosine >= 0.97 to its
# original, while distinct scenes stay below 0.89 and the original is always the nearest, by >= 0.11
# (with BLIP's own init all 32 are above 0.99999; vision 0.5 gives 0.92 for some copies); texts
# differ (cosine ~0.3).
_RETRIEVAL_STD = {"vision_model": 0.4, "text_encoder": 0.5}

# BLIP's normalisation constants (the OpenAI CLIP ones), as in the real preprocessor_config.json.
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD_TEXT = """
a an the of in on at with and or to from by for is are was were be it its this that there
man woman men women person people boy girl child children baby player group crowd family
dog dogs cat cats horse bird birds cow sheep elephant giraffe zebra bear fish animal animals
car cars bus truck train plane boat bike bicycle motorcycle street road city building house
room kitchen table chair bed couch window door wall floor sign clock light tree trees grass
field water beach ocean sea river lake sky cloud clouds snow mountain hill park garden sand
picture photo photograph photography image view close up front back top side next near
sitting standing walking running riding playing holding eating looking lying flying parked
white black red blue green yellow brown gray grey orange pink purple large small big little
two three four several many some other one old young tall long short open empty full
shirt hat jacket bag umbrella ball frisbee kite skateboard surfboard ski skis board racket
plate food pizza sandwich cake bowl cup glass bottle banana apple orange fruit vegetables
computer laptop phone screen keyboard book books bench fence pole tower bridge track grassy
over under into down out through behind around along across while during has have
"""
_WORDS = _WORD_TEXT.split()
_PIECES = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##y", "##n", "##t", "##e", "##a", "##o"]
_CHARS = [*"abcdefghijklmnopqrstuvwxyz0123456789", *".,!?'-:;()"]


def _vocab() -> list[str]:
    # Single characters and ``##x`` pieces let any ASCII prompt tokenize without [UNK].
    tokens = [*_SPECIAL, *_WORDS, *_CHARS, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"], *_PIECES]
    return list(dict.fromkeys(tokens))  # de-duplicate, keep first order: ids must be stable


def _marker(seed: int, image_size: int, patch_size: int, kind: str = "caption") -> dict[str, Any]:
    if kind == "caption":  # unchanged since format 2, so existing caption checkpoints stay valid
        return {"format": FORMAT, "seed": seed, "image_size": image_size, "patch_size": patch_size}
    return {"kind": kind, "format": RETRIEVAL_FORMAT, "seed": seed, "image_size": image_size, "patch_size": patch_size}


def _is_complete(directory: Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((directory / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def write_tiny_checkpoint(
    directory: Path, *, seed: int = 0, image_size: int = 384, patch_size: int = PATCH_SIZE
) -> Path:
    """Write (or reuse) a tiny random BLIP captioning checkpoint in ``directory`` and return it.

    Deterministic for a given ``seed``; an existing complete checkpoint with the same settings is
    returned untouched. The files are written beside the target and renamed into place, so a
    concurrent writer or a crash never leaves a half-written checkpoint that looks complete.
    """
    return _write_atomically(
        Path(directory), _write_caption, seed=seed, image_size=image_size, patch_size=patch_size, kind="caption"
    )


def write_tiny_retrieval_checkpoint(
    directory: Path, *, seed: int = 0, image_size: int = 384, patch_size: int = PATCH_SIZE
) -> Path:
    """Write (or reuse) a tiny random ``BlipForImageTextRetrieval`` checkpoint in ``directory``.

    Like :func:`write_tiny_checkpoint` (same tokenizer, processor and atomic write), but with
    BLIP-base's 256-d image-text projections and weights scaled so that an image's embedding
    depends clearly on its content: a re-encoded or slightly brightened copy stays far closer to
    its original than other pictures are. Its marker differs from a caption checkpoint's, so one
    kind of directory is never taken for the other.
    """
    return _write_atomically(
        Path(directory), _write_retrieval, seed=seed, image_size=image_size, patch_size=patch_size, kind="retrieval"
    )


def _write_atomically(
    directory: Path, write: Callable[..., None], *, seed: int, image_size: int, patch_size: int, kind: str
) -> Path:
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    marker = _marker(seed, image_size, patch_size, kind)

    def write_into(out: Path) -> None:
        quiet_bars_off_a_terminal()
        write(out, seed=seed, image_size=image_size, patch_size=patch_size)

    return install_checkpoint(directory, marker, write_into)


class CheckpointFolderError(ValueError):
    """The target of a tiny checkpoint is not a folder the writer may fill or replace: a file, or a
    non-empty folder that holds no tiny checkpoint (no marker file)."""


def check_target(directory: Path) -> None:
    """Refuse a target the writer must not touch. A new path, an empty folder and a folder holding an
    earlier tiny checkpoint (its marker file) are the only ones it writes: anything else may be
    someone's files (``imgq dev tiny-model .`` once wiped the current folder)."""
    if not directory.exists():
        if directory.is_symlink():
            raise CheckpointFolderError(f"{directory} is a broken symbolic link, not a folder")
        above = next((p for p in directory.absolute().parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise CheckpointFolderError(f"{_shown(directory, above)} is not a folder")
        return
    if not directory.is_dir():
        raise CheckpointFolderError(f"{directory} is not a folder")
    if (directory / MARKER).is_file():
        return
    if any(directory.iterdir()):
        raise CheckpointFolderError(f"{directory} is not empty and holds no tiny checkpoint; choose an empty or "
                                    "new folder")


def _shown(directory: Path, ancestor: Path) -> Path:
    """``ancestor`` of ``directory`` as the caller spelled it (relative stays relative)."""
    for parent in directory.parents:
        if parent.absolute() == ancestor:
            return parent
    return ancestor


def install_checkpoint(directory: Path, marker: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """Write (or reuse) a checkpoint whose marker is ``marker`` in ``directory`` and return ``directory``.

    ``write(folder)`` writes the files into a staging folder beside the target; the marker is written
    last, since its presence means "complete". A new target is the staging folder renamed; an existing
    one (empty, or holding an earlier tiny checkpoint: :func:`check_target` refuses anything else) keeps
    its inode: its marker is first made "incomplete", the earlier checkpoint's files go, the new ones
    move in, and the new marker comes last, so a crash leaves a folder marked as an incomplete tiny
    checkpoint, which the next call replaces (whatever its settings)."""
    directory = Path(directory)
    if _is_complete(directory, marker):
        return directory
    check_target(directory)  # before the work, and again before anything is deleted
    target = directory.resolve()  # "." has no name to stage beside, and its parent is ".."
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        (staging / MARKER).write_text(json.dumps(marker))  # last: it means "complete"
        if not target.exists():
            try:
                os.replace(staging, target)
                return directory
            except OSError:
                if not target.is_dir():  # not another writer that created it meanwhile
                    raise
        if _is_complete(target, marker):  # another writer won the race
            return directory
        check_target(target)
        # Marked incomplete before anything goes: a run cut short here leaves a folder that is still
        # a tiny checkpoint's (check_target lets the next run replace it) but never one that passes
        # for complete with files missing.
        (target / MARKER).write_text(json.dumps({"incomplete": True}))
        for entry in list(target.iterdir()):  # an earlier tiny checkpoint's files, its marker last
            if entry.name == MARKER:
                continue
            # A concurrent writer replacing the same folder may have taken a file first.
            with contextlib.suppress(FileNotFoundError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for entry in staging.iterdir():
            if entry.name != MARKER:
                os.replace(entry, target / entry.name)
        os.replace(staging / MARKER, target / MARKER)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _tokenizer(out: Path) -> tuple[BertTokenizer, dict[str, int]]:
    """BLIP's tokenizer layout over the tiny vocabulary; also writes ``vocab.txt``."""
    vocab = _vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5's BertTokenizer is the `tokenizers`-backed one and ignores ``vocab_file``.
    tokenizer = BertTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        do_lower_case=True,
        model_max_length=512,
        bos_token="[DEC]",
    )
    # BLIP's tokenizer has [DEC] (bos) and [ENC] appended after the BERT vocabulary.
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in ("[PAD]", "[SEP]", "[DEC]", "[ENC]")}
    assert ids["[DEC]"] == len(vocab) and ids["[ENC]"] == len(vocab) + 1, ids  # a broken vocab must never be saved
    return tokenizer, ids


def _text_config(tokenizer: BertTokenizer, ids: dict[str, int], max_positions: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_positions,
        "bos_token_id": ids["[DEC]"],
        "sep_token_id": ids["[SEP]"],
        "eos_token_id": ids["[SEP]"],
        "pad_token_id": ids["[PAD]"],
    }


def _vision_config(image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _save_processor(out: Path, tokenizer: BertTokenizer, image_size: int) -> None:
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=list(BLIP_MEAN), image_std=list(BLIP_STD)
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


def _write_caption(out: Path, *, seed: int, image_size: int, patch_size: int) -> None:
    tokenizer, ids = _tokenizer(out)
    config = BlipConfig(
        text_config=_text_config(tokenizer, ids, max_positions=128),
        vision_config=_vision_config(image_size, patch_size),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
        # The default init (std 0.02) makes every caption the same few tokens; larger weights in the
        # text path make the caption depend visibly on the image, which the tests rely on.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, 0.5 if "text_decoder" in name else 0.2)
            # Random weights would sometimes end a caption at once, or fill it with special tokens,
            # which decode to "". Never emitting them makes every caption max_new_tokens words long,
            # so a test can always tell a captioned item from an empty result.
            model.text_decoder.cls.predictions.bias[tokenizer.all_special_ids] = -1e4
    model.generation_config = GenerationConfig(
        bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"], max_new_tokens=20
    )
    model.save_pretrained(out)
    _save_processor(out, tokenizer, image_size)


def _write_retrieval(out: Path, *, seed: int, image_size: int, patch_size: int) -> None:
    tokenizer, ids = _tokenizer(out)
    config = BlipConfig(
        # 512 positions, as BLIP's text encoder has: max_text_tokens is read from it.
        text_config=_text_config(tokenizer, ids, max_positions=512),
        vision_config=_vision_config(image_size, patch_size),
        image_text_hidden_size=RETRIEVAL_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, _retrieval_std(name))
            # Not the identity (as BLIP's init leaves it): applying this norm twice, as the vision
            # model's pooler_output does, then changes the embedding, as it would for real weights.
            norm = model.vision_model.post_layernorm
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    model.save_pretrained(out)
    _save_processor(out, tokenizer, image_size)


def _retrieval_std(name: str) -> float:
    """Init scale of one weight. BLIP's own init (std 0.02, vision position embeddings ~1e-10)
    leaves [CLS] nearly independent of the pixels, so every image embeds to almost one vector."""
    return _RETRIEVAL_STD.get(name.split(".")[0], 0.2)
