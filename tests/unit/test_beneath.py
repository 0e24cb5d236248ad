"""Local files are opened beneath their root with no symlink anywhere, never block, and must be
regular files (real filesystem, no services)."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from imgq import errors
from imgq.config import Settings
from imgq.producer.expand import Expander
from imgq.worker.beneath import open_beneath
from imgq.worker.fetch import Fetcher


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    (outside / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.jpg").write_bytes(b"inside")
    (outside / "b" / "x.jpg").write_bytes(b"SECRET")
    return root.resolve(), outside.resolve()


def read(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def test_a_regular_file_beneath_the_root_opens(tree):
    root, _ = tree
    fd = open_beneath(root / "a" / "b" / "x.jpg", [root])
    assert os.get_blocking(fd), "opened non-blocking (for FIFOs), handed over blocking"
    assert read(fd) == b"inside"


def test_the_root_itself_and_paths_outside_it_are_refused_by_name(tree):
    root, outside = tree
    for path in (root, outside / "b" / "x.jpg"):
        with pytest.raises(errors.BadRef) as refused:
            open_beneath(path, [root])
        assert refused.value.message == f"{path} is outside IMGQ_LOCAL_ROOTS"


def test_a_device_is_not_a_file(tree):
    root, _ = tree
    device = root / "a" / "null.jpg"
    try:
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    with pytest.raises(errors.NotAFile) as refused:
        open_beneath(device, [root])
    assert refused.value.message == f"{device} is not a regular file"


def test_a_parent_swapped_for_a_symlink_after_the_check_is_refused(tree):
    root, outside = tree
    target = root / "a" / "b" / "x.jpg"  # what confine() resolved earlier
    (root / "a" / "b" / "x.jpg").unlink()
    (root / "a" / "b").rmdir()
    (root / "a" / "b").symlink_to(outside / "b")  # the swap
    with pytest.raises(errors.BadRef) as refused:
        open_beneath(target, [root])
    assert refused.value.message == f"{target}: 'b' is a symlink or not a folder (checked at open)"


def test_a_last_component_symlink_is_refused(tree):
    root, outside = tree
    link = root / "a" / "link.jpg"
    link.symlink_to(outside / "b" / "x.jpg")
    with pytest.raises(errors.BadRef):
        open_beneath(link, [root])


def test_a_fifo_is_refused_at_once_without_blocking(tree):
    root, _ = tree
    fifo = root / "a" / "pipe.jpg"
    os.mkfifo(fifo)
    t = time.monotonic()
    with pytest.raises(errors.NotAFile) as refused:
        open_beneath(fifo, [root])
    assert refused.value.message == f"{fifo} is a FIFO"
    assert time.monotonic() - t < 1.0


def test_a_socket_and_a_folder_are_not_files(tree):
    root, _ = tree
    sock_path = root / "a" / "s.jpg"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        with pytest.raises(errors.NotAFile, match=f"^{sock_path} is a socket$"):
            open_beneath(sock_path, [root])
    finally:
        server.close()
    with pytest.raises(errors.NotAFile) as refused:
        open_beneath(root / "a", [root])
    assert refused.value.message == f"{root / 'a'} is a folder"


def test_the_fetcher_refuses_a_fifo_permanently_and_never_hangs(tree):
    root, _ = tree
    os.mkfifo(root / "a" / "pipe.jpg")
    fetcher = Fetcher(Settings(_env_file=None, local_roots=[root]))
    done = threading.Event()
    outcome: list[BaseException] = []

    def go() -> None:
        try:
            fetcher.fetch(str(root / "a" / "pipe.jpg"))
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(5), "a FIFO blocked the decode thread"
    assert isinstance(outcome[0], errors.NotAFile) and outcome[0].code == "not_a_file"


def test_enqueue_skips_hidden_folders_and_special_files_and_refuses_a_fifo_ref(tree):
    root, _ = tree
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id.png").write_bytes(b"key")
    os.mkfifo(root / "a" / "pipe.jpg")
    expand = Expander(Settings(_env_file=None, local_roots=[root]))
    assert expand(str(root)) == [str(root / "a" / "b" / "x.jpg")]
    with pytest.raises(errors.RefRefused, match="not a regular file"):
        expand(str(root / "a" / "pipe.jpg"))
