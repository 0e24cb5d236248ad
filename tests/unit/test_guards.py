"""Direct tests of the guards that only slow e2e tests used to cover, so that breaking one fails
a test in seconds: ack after commit in the writer, the last partial message, the sibling-prefix
escape, a symlink swapped in between the check and the open."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imgq import errors
from imgq.config import Settings
from imgq.contract import CaptionParams, make_task
from imgq.ports import Blob, DoneItem
from imgq.publish import chunk_messages
from imgq.refs import LocalRef, confine, parse_ref
from imgq.worker import fetch as fetch_module
from imgq.worker.beneath import open_beneath
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner, MemoryResults
from imgq.worker.fetch import Fetcher
from tests.jobs import caption_task
from tests.waits import SETTLE_S

# -- the writer resolves an item's future only after its transaction commits --------------------


class GatedResults(MemoryResults):
    """A store whose writes hold at a gate: the transaction is 'open' until the test opens it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write_done(self, items: Sequence[DoneItem]) -> None:
        if items:
            self.entered.set()
            assert self.gate.wait(10), "the test never opened the gate"
        super().write_done(items)


@dataclass
class Picture:
    image: np.ndarray
    width: int = 4
    height: int = 4


def _blob(ref: str) -> Blob:
    return Blob(ref.encode(), "local", "", ref, "v1")


def _decode(data: bytes) -> Picture:
    return Picture(np.full((3, 4, 4), 0.5, dtype=np.float32))


def test_the_writer_resolves_futures_only_after_the_write_commits():
    results = GatedResults()
    engine = Engine(store=results, runners={"caption": EchoRunner()}, fetch=_blob, decode=_decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=1).start()
    try:
        seen_at_resolution: list[int] = []
        called = threading.Event()

        def on_resolved(_future: object) -> None:
            seen_at_resolution.append(len(results.done))
            called.set()

        [item] = engine.submit(uuid.uuid4(), [make_task("caption", "echo", CaptionParams())], [(0, "/d/a.jpg")])
        item.future.add_done_callback(on_resolved)
        assert results.entered.wait(SETTLE_S), "the item never reached the writer"
        # The write is in progress and has not committed: a message acknowledged now could lose it.
        assert not item.future.done()
        with pytest.raises(TimeoutError):
            item.future.result(0.3)
        results.gate.set()
        assert item.future.result(SETTLE_S).state == "done"
        assert called.wait(SETTLE_S)
        assert seen_at_resolution == [1], "resolved before the row was stored"
    finally:
        results.gate.set()
        engine.stop()


# -- chunking: the last, partial message ------------------------------------------------------------


@pytest.mark.parametrize(("n", "per"), [(1, 16), (17, 16), (33, 16), (5, 2), (7, 3)])
def test_the_last_partial_chunk_is_sent(n, per):
    items = [(seq, f"/d/{seq}.jpg") for seq in range(n)]
    messages = list(chunk_messages(job="j", tasks=[caption_task("m")], items=items, per_message=per))
    assert len(messages[-1].items) == n % per or per
    assert [tuple(i) for m in messages for i in m.items] == items


# -- the sibling-prefix escape: /root-evil is not inside /root ----------------------------------------


@pytest.fixture
def siblings(tmp_path: Path) -> tuple[Path, Path]:
    root, evil = (tmp_path / "root").resolve(), (tmp_path / "root-evil").resolve()
    root.mkdir()
    evil.mkdir()
    (root / "x.jpg").write_bytes(b"inside")
    (evil / "x.jpg").write_bytes(b"SECRET")
    return root, evil


def test_a_sibling_folder_sharing_the_roots_prefix_is_refused_at_parse(siblings):
    root, evil = siblings
    assert confine(root / "x.jpg", [root]) == root / "x.jpg"
    with pytest.raises(errors.RefRefused) as refused:
        confine(evil / "x.jpg", [root])
    assert refused.value.message == f"{str(evil / 'x.jpg')!r} is outside IMGQ_LOCAL_ROOTS"
    with pytest.raises(errors.RefRefused):
        parse_ref(str(evil / "x.jpg"), allowed_buckets=[], local_roots=[root])


def test_a_sibling_folder_sharing_the_roots_prefix_is_refused_at_open(siblings):
    root, evil = siblings
    with pytest.raises(errors.BadRef, match="outside"):
        open_beneath(evil / "x.jpg", [root])
    with pytest.raises(errors.BadRef) as refused:
        open_beneath(root / ".." / "root-evil" / "x.jpg", [root])
    assert refused.value.message == f"{root / '..' / 'root-evil' / 'x.jpg'} is outside IMGQ_LOCAL_ROOTS"


def test_the_fetcher_refuses_a_sibling_prefix_ref(siblings):
    root, evil = siblings
    fetcher = Fetcher(Settings(_env_file=None, local_roots=[root]))
    assert fetcher.fetch(str(root / "x.jpg")).data == b"inside"
    with pytest.raises(errors.BadRef):
        fetcher.fetch(str(evil / "x.jpg"))


# -- a symlink swapped in after confine(), before the open -----------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = (tmp_path / "root").resolve(), (tmp_path / "outside").resolve()
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "x.jpg").write_bytes(b"inside")
    (outside / "x.jpg").write_bytes(b"SECRET")
    return root, outside


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_symlink_swapped_in_between_the_check_and_the_open_is_refused(tree, monkeypatch, swapped):
    """The fetcher confines the ref, then opens it; the swap is made to land exactly in between."""
    root, outside = tree
    target = root / "a" / "x.jpg"

    def swap_then_open(path: Path, roots: list[Path]) -> int:
        assert path == target, "confine() already ran on the ref"
        if swapped == "file":
            target.unlink()
            target.symlink_to(outside / "x.jpg")
        else:
            target.unlink()
            (root / "a").rmdir()
            (root / "a").symlink_to(outside)
        return open_beneath(path, roots)

    monkeypatch.setattr(fetch_module, "open_beneath", swap_then_open)
    fetcher = Fetcher(Settings(_env_file=None, local_roots=[root]))
    assert isinstance(parse_ref(str(target), allowed_buckets=[], local_roots=[root]), LocalRef)
    with pytest.raises(errors.BadRef, match="symlink"):
        fetcher.fetch(str(target))


def test_a_symlink_loop_on_the_way_is_refused_at_parse(tmp_path: Path):
    """realpath stops resolving at a loop and keeps the rest as written, so root/loop/../out came
    back as root/out: inside the root by name, a symlink to outside in fact."""
    root, outside = (tmp_path / "root").resolve(), (tmp_path / "outside").resolve()
    root.mkdir()
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"SECRET")
    (root / "out").symlink_to(outside)
    (root / "loop").symlink_to(root / "loop")
    raw = root / "loop" / ".." / "out" / "x.jpg"
    with pytest.raises(errors.RefRefused) as refused:
        confine(raw, [root])
    assert refused.value.message == f"{str(raw)!r} cannot be resolved (a symlink loop)"


# -- the kind registry: one spec per name -------------------------------------------------------------


def test_a_kind_registers_once_and_a_second_registration_is_refused(monkeypatch):
    from dataclasses import replace

    from imgq import kinds

    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    new = replace(kinds.spec("caption"), name="caption2")
    assert kinds.register(new) is new and kinds.spec("caption2") is new
    with pytest.raises(ValueError, match=r"^kind 'caption' is already registered$"):
        kinds.register(replace(kinds.spec("embed"), name="caption"))
    assert kinds.spec("caption").params is CaptionParams, "the first registration stands"


# -- messages on the wire and parameters -------------------------------------------------------------


def test_a_message_body_is_plain_json():
    """What goes to the broker is JSON-native (lists, not tuples): it reads back equal."""
    body = chunk_messages(job="j", tasks=[caption_task("m")], items=[(0, "/d/0.jpg")], per_message=4)
    payload = next(body).to_json()
    assert json.loads(json.dumps(payload)) == payload
    assert payload["items"] == [[0, "/d/0.jpg"]]


def test_bad_parameters_name_the_kind_and_each_field_as_the_caller_names_it():
    from imgq.errors import BadParams
    from imgq.kinds import spec

    with pytest.raises(BadParams) as info:
        spec("caption").parse({"num_beams": 0}, lambda field: f"--{field.replace('_', '-')}")
    assert info.value.message.startswith("invalid caption parameters: --num-beams: ")


def test_unknown_and_missing_kinds_are_refused_with_the_known_ones_listed():
    from imgq.errors import BadParams
    from imgq.kinds import KINDS, parse_kinds

    with pytest.raises(BadParams) as info:
        parse_kinds("caption,bogus")
    assert info.value.message == f"unknown job kind 'bogus'; known kinds: {', '.join(KINDS)}"
    with pytest.raises(BadParams) as info:
        parse_kinds(" , ")
    assert info.value.message == "name at least one job kind, e.g. caption or caption,embed"
    assert parse_kinds("embed, caption,embed") == ["caption", "embed"]


def test_a_pointer_skips_items_that_are_not_seq_lists_without_failing():
    from imgq.worker.service import pointer

    job = uuid.uuid4()
    assert pointer({"job": str(job), "items": [5, [], "x", None, [1, "/x"], (2, "/y")]}) == (job, [1, 2])
