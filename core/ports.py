"""The engine's ports: the row types it exchanges and the interfaces of what it talks to.

Pure: no SQL, torch, boto3 or celery. The worker's engine and service, the in-memory fakes and
the real adapters (``imgq.db.store``, ``imgq.worker.fetch``, ``imgq.publish``) all meet here, so
the data path can run against fakes without planting modules.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Blob:
    """An object's bytes and the identity of the version that was read."""

    data: bytes
    source: str  # "s3" | "local"
    bucket: str
    key: str
    version: str


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the worker learned about the stored object it processed."""

    source: str  # "s3" | "local"
    bucket: str
    key: str
    version: str
    bytes: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Claim:
    attempts: int  # deliveries so far, this one included
    unsettled: bool  # an earlier delivery took the item and never settled it (a crash?)
    # What the job's record says the item is; a message only points at it (job, seq).
    ref: str = ""
    text: str | None = None

    def item(self, seq: int) -> tuple[int, str] | tuple[int, str, str]:
        """The ``[seq, ref]`` (or ``[seq, ref, text]``) item as recorded."""
        return (seq, self.ref) if self.text is None else (seq, self.ref, self.text)


@dataclass(frozen=True, slots=True)
class DeadRow:
    job: uuid.UUID
    seq: int
    code: str
    message: str
    worker: str


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One kind's result for one item, ready to store (``image_id`` is filled in by the store)."""

    job: uuid.UUID
    seq: int
    image_id: int
    model: str
    model_revision: str
    params_hash: str
    params: dict[str, Any]
    value: Any  # caption: str; embed: 1-D float32 array; validate: (itm_score, cosine)
    text: str | None = None  # the pair's text (validate)


@dataclass(frozen=True, slots=True)
class DoneItem:
    """An item whose every task produced a value: stored in one transaction, then finished."""

    job: uuid.UUID
    seq: int
    obj: ObjectInfo
    worker: str
    # kind -> (model, model_revision, params_hash, params, value)
    results: dict[str, tuple[str, str, str, dict[str, Any], Any]]
    text: str | None = None


class ResultWriter(Protocol):
    """Owns one kind's result table: its bulk write and the SQL fragments that read it back."""

    kind: str
    table: str  # the result table
    link_column: str  # the job_items column that points at this kind's row
    # Select-list for `imgq results`, reading the table under the alias ``r_<kind>``.
    results_columns: str

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> dict[tuple[uuid.UUID, int], int]:
        """Upsert ``rows`` (one statement per model/params group, never one per row) and return
        each item's result id, ``(job, seq) -> id``; the store sets ``link_column`` when it
        finishes the items. The first stored result for an identity wins."""
        ...


class ItemStore(Protocol):
    """The worker's view of the system of record."""

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, Any]] | None:
        """The job's recorded ``[{kind, model, params, params_hash}]``; None if there is no such job."""
        ...

    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *,
              leave_peers: bool = False) -> dict[int, Claim]:
        """Count a delivery of each unfinished item (``leave_peers``: not those another registered
        worker is running)."""
        ...

    def existing_caption(self, source: str, bucket: str, key: str, version: str, model: str, revision: str,
                         params_hash: str) -> tuple[str, int, int] | None:
        """The English caption already stored for this object version, model, revision and params:
        ``(text, width, height)``; None if there is none."""
        ...

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        """Of ``seqs``, the items an earlier delivery took and never settled (crash suspects).
        Reads only: nothing is charged."""
        ...

    def records(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        """The unfinished items among ``seqs`` as recorded: ``seq -> (seq, ref)`` or ``(seq, ref, text)``."""
        ...

    def release(self, job: uuid.UUID, seqs: Sequence[int]) -> None: ...

    def write_done(self, items: Sequence[DoneItem]) -> set[tuple[uuid.UUID, int]] | None:
        """Commit results; the (job, seq) it finished, where the store can tell (None: all of them)."""
        ...

    def write_dead(self, rows: Sequence[DeadRow]) -> set[tuple[uuid.UUID, int]] | None: ...


class BlobSource(Protocol):
    def fetch(self, ref: str) -> Blob: ...


class Publisher(Protocol):
    """Hands messages to the broker, ``delay_s`` from now."""

    def __call__(self, messages: Iterable[Any], delay_s: float) -> Any: ...


class Decoded(Protocol):
    """A decoded image: the RGB picture (possibly draft-reduced) and the original's size."""

    image: Any
    width: int
    height: int


class Runner(Protocol):
    """One job kind on one loaded model (see ``imgq.worker.runners``)."""

    kind: str
    name: str  # the model name it serves; a task naming another model is not served

    @property
    def revision(self) -> str: ...

    @property
    def input_size(self) -> int:
        """Side of the square model input: decoding may reduce a JPEG down to it."""
        ...

    def prep_key(self, params: Any) -> Any:
        """Identity of the prepared input: tasks with equal keys share one preprocessed array."""
        ...

    def prepare(self, image: Any, params: Any, original: tuple[int, int] | None = None) -> Any:
        """A decoded image -> this model's input array (runs on decode threads)."""
        ...

    def check_text(self, text: str) -> None:
        """Raise a ``Permanent`` error for a text this model cannot take (pair kinds)."""
        ...

    def run(self, pixels: Any, texts: list[str] | None, params: Any) -> list[Any]:
        """One value per image of a batch (texts: one per image, for pair kinds)."""
        ...



class CaptionText(str):
    """A caption that is not BLIP's own English (the text, exactly as a plain caption), carrying its
    language and what made it for the result writer (``imgq.languages``). A plain ``str`` value is
    a native English caption."""

    lang: str
    method: str  # "translated" | "adapter"
    via: str  # the translation model, or the adapter's name
    via_revision: str  # that model's revision, or the SHA-256 of the adapter's weights

    def __new__(cls, text: str, *, lang: str, method: str, via: str, via_revision: str) -> CaptionText:
        obj = super().__new__(cls, text)
        obj.lang, obj.method, obj.via, obj.via_revision = lang, method, via, via_revision
        return obj
