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


def _outcome(fn, raw: str) -> tuple[str, str]:
    try:
        return "ok", str(fn(raw))
    except RefRefused as exc:
        return "refused", exc.message


S3_CASES = [
    "s3://photos/2024/a.jpg", "S3://photos/a.jpg", "s3://Photos/a.jpg", "s3://other/a.jpg", "s3:///a.jpg",
    "s3://photos", "s3://photos/", "s3://photos/dir/", "s3://photos/a\x00.jpg", "s3://photos/a\x7f.jpg",
    "s3://photos/a\tb.jpg", "s3://photos/ünï\u00a0code.jpg", "s3://photos/é\x1f.jpg", "s3://photos/trailing ",
    "s3://photos/" + "k" * 2036, "s3://photos/" + "k" * 2037, "s3://photos/" + "é" * 2037, "s3://photos//a.jpg",
]


@pytest.mark.parametrize("raw", S3_CASES)
def test_s3_object_ref_is_parse_ref_for_s3_refs(raw: str):
    from imgq.refs import s3_object_ref

    slow = _outcome(lambda r: parse_ref(r, allowed_buckets=["photos"], local_roots=[]), raw)
    assert _outcome(lambda r: s3_object_ref(r, ["photos"]), raw) == slow


def test_s3_object_ref_agrees_with_parse_ref_on_any_text():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from imgq.refs import s3_object_ref

    @settings(max_examples=500, deadline=None)
    @given(st.sampled_from(["s3://", "S3://", "s3:/"]), st.sampled_from(["photos", "other", "", "photos/"]),
           st.text(max_size=40))
    def check(scheme: str, bucket: str, rest: str) -> None:
        raw = f"{scheme}{bucket}/{rest}"
        if not raw.lower().startswith("s3://"):
            return
        assert _outcome(lambda r: s3_object_ref(r, ["photos"]), raw) == _outcome(
            lambda r: parse_ref(r, allowed_buckets=["photos"], local_roots=[]), raw)

    check()
