import os
from pathlib import Path

import pytest

from imgq.errors import RefRefused
from imgq.refs import LocalRef, S3Ref, parse_ref


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path / "secret.txt", tmp_path / "ok" / "escape.jpg")
    return (tmp_path / "ok").resolve()


def parse(raw: str, root: Path):
    return parse_ref(raw, allowed_buckets=["photos"], local_roots=[root])


def test_s3_and_local_refs_parse(root: Path):
    assert parse("s3://photos/2024/a.jpg", root) == S3Ref("photos", "2024/a.jpg")
    assert parse(str(root / "a.jpg"), root) == LocalRef(root / "a.jpg")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("s3://other/a.jpg", "not in IMGQ_ALLOWED_BUCKETS"),
        ("s3://photos/", "names no object key"),
        ("s3:///a.jpg", "no bucket"),
        ("http://169.254.169.254/latest/meta-data", "URLs are not accepted"),
        ("https://example.com/a.jpg", "URLs are not accepted"),
        ("file:///etc/passwd", "URLs are not accepted"),
        ("/etc/passwd", "outside IMGQ_LOCAL_ROOTS"),
        ("{root}/../secret.txt", "outside IMGQ_LOCAL_ROOTS"),
        ("{root}/escape.jpg", "outside IMGQ_LOCAL_ROOTS"),
        ("{root}/a\x00.jpg", "control characters"),
        ("", "empty reference"),
        ("   ", "empty reference"),
        ("s3://photos/2024/", "names no object key"),
        ("sftp://host/a.jpg", "URLs are not accepted"),
        ("photos://a.jpg", "URLs are not accepted"),
    ],
)
def test_refused_refs(root: Path, raw: str, fragment: str):
    with pytest.raises(RefRefused) as info:
        parse(raw.format(root=root), root)
    assert fragment in info.value.message


def test_local_refs_disabled_without_roots():
    with pytest.raises(RefRefused, match=r"^local refs are disabled: IMGQ_LOCAL_ROOTS is empty$"):
        parse_ref("/tmp/a.jpg", allowed_buckets=[], local_roots=[])


@pytest.mark.parametrize(("raw", "message"), [
    ("   ", "empty reference"),
    ("s3://photos/" + "k" * 2037, "reference longer than 2048 characters"),  # 2049 characters
])
def test_refusal_messages_are_exact(root: Path, raw: str, message: str):
    with pytest.raises(RefRefused) as info:
        parse(raw, root)
    assert info.value.message == message


def test_the_longest_accepted_ref_is_2048_characters(root: Path):
    raw = "s3://photos/" + "k" * 2036
    assert len(raw) == 2048
    assert parse(raw, root) == S3Ref("photos", "k" * 2036)
