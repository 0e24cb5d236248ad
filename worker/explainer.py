"""Explaining captions: the caption model's captured cross-attention assembled per image
(:mod:`imgq.explain`) and drawn (:mod:`imgq.worker.overlay`). Used by ``imgq explain`` and by the
caption runner for jobs enqueued with ``--explain``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgq import errors
from imgq.explain import Explanation, Geometry, HeadReduce, assemble
from imgq.params import CaptionParams
from imgq.worker.model import CaptionModel
from imgq.worker.overlay import EXPLAIN_JSON, document, dumps, render_files


def check_layer(model: CaptionModel, layer: int | None) -> None:
    count = model.decoder_shape["cross_attention_layers"]
    if layer is not None and not 0 <= layer < count:
        raise errors.BadParams(f"--layer {layer} is out of range: the decoder has {count} cross-attention layers "
                               f"(0 to {count - 1})")


def explain_batch(
    model: CaptionModel,
    pixels: np.ndarray,
    params: CaptionParams,
    *,
    heads: HeadReduce = "mean",
    layer: int | None = None,
    keep_layers: bool = False,
) -> list[Explanation]:
    """One explanation per image of a batch, from one batched ``generate``."""
    captions, attentions = model.explain(pixels, params, heads)
    eos = model.eos_token_id
    grid = model.patch_grid
    out = []
    for caption, att in zip(captions, attentions, strict=True):
        ids = [int(i) for i in att.ids]
        # None for an id past the tokenizer's vocabulary (the model's may be larger): no word.
        tokens = [t or "" for t in model.tokenizer.convert_ids_to_tokens(ids)]
        out.append(assemble(caption, ids, tokens, att.prompt_len, eos, att.maps, grid,
                            heads=heads, layer=layer, keep_layers=keep_layers))
    return out


def model_info(model: CaptionModel) -> dict[str, Any]:
    return {"name": model.name, "revision": model.revision, "decoder": model.decoder_shape}


def explain_image(
    model: CaptionModel,
    image: Image.Image,
    pixels: np.ndarray,
    params: CaptionParams,
    *,
    ref: str | None,
    heads: HeadReduce = "mean",
    layer: int | None = None,
    keep_layers: bool = False,
    max_side: int = 768,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(explain.json document, files by name) for one decoded image and its prepared pixels."""
    explanation = explain_batch(model, pixels[None], params, heads=heads, layer=layer, keep_layers=keep_layers)[0]
    geometry = Geometry.of(params.resize, image.width, image.height, int(pixels.shape[-1]))
    files = render_files(image, explanation, geometry, max_side=max_side)
    doc = document(explanation, geometry, ref=ref, model=model_info(model), params=params.canonical(),
                   files=files)
    files[EXPLAIN_JSON] = dumps(doc)
    return doc, files


def write_files(directory: Path, files: Mapping[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


class OverlaySink:
    """Where a worker writes the overlays of explained jobs: ``IMGQ_EXPLAIN_OUTPUT``, a local folder
    or ``s3://bucket/prefix`` (Settings refuses a source bucket or root). Each explanation gets its
    own folder, named by the caller; writing one again overwrites it with the same bytes."""

    def __init__(self, where: str, s3_client: Any | None = None, settings: Any | None = None) -> None:
        self.where = where.rstrip("/")
        self._s3 = s3_client
        self._settings = settings

    def write(self, name: str, files: Mapping[str, bytes]) -> str:
        """Write ``files`` under ``name``; returns the folder's location."""
        if self.where.startswith("s3://"):
            bucket, _, prefix = self.where[5:].partition("/")
            key_prefix = f"{prefix}/{name}" if prefix else name
            client = self._client()
            for file, data in files.items():
                content = "application/json" if file.endswith(".json") else "image/png"
                client.put_object(Bucket=bucket, Key=f"{key_prefix}/{file}", Body=data, ContentType=content)
            return f"s3://{bucket}/{key_prefix}/"
        folder = Path(self.where).expanduser() / name
        write_files(folder, files)
        return str(folder) + "/"

    def _client(self) -> Any:
        if self._s3 is None:
            from imgq.s3 import make_s3_client

            self._s3 = make_s3_client(self._settings)
        return self._s3
