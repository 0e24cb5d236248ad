"""The producer's ref acceptance: the S3 object fast path gives what the general expansion gives."""

from pathlib import Path

import pytest

from imgq.config import Settings
from imgq.errors import RefRefused
from imgq.producer.expand import Expander
from imgq.producer.submit import accept_refs


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "a.jpg").write_bytes(b"x")
    return Settings(_env_file=None, allowed_buckets=["photos"], local_roots=[tmp_path])


@pytest.mark.parametrize("raw", ["s3://photos/a.jpg", " S3://photos/b.jpg ", "s3://photos/c d.jpg"])
def test_object_refs_take_the_fast_path_and_match_the_expansion(settings: Settings, raw: str) -> None:
    expand = Expander(settings)
    assert expand.object_ref(raw) is not None
    assert [expand.object_ref(raw)] == expand(raw)


@pytest.mark.parametrize("raw", ["s3://photos/prefix/", "# a comment", "", "{root}/a.jpg", "{root}"])
def test_everything_else_is_left_to_the_expansion(settings: Settings, raw: str) -> None:
    assert Expander(settings).object_ref(raw.format(root=settings.local_roots[0])) is None


def test_refused_refs_are_collected_with_the_expansion_s_reasons(settings: Settings) -> None:
    root = settings.local_roots[0]
    raw = ["s3://photos/a.jpg", "s3://other/a.jpg", "s3://photos/x\x00.jpg", f"{root}/a.jpg", "https://x/y.jpg"]
    rejected: list[tuple[str, str]] = []
    accepted = list(accept_refs(raw, settings, skip_invalid=True, rejected=rejected))
    assert accepted == ["s3://photos/a.jpg", str(root / "a.jpg")]
    reasons = []
    for bad in raw[1:3] + raw[4:]:
        with pytest.raises(RefRefused) as info:
            Expander(settings)(bad)
        reasons.append((bad, info.value.message))
    assert rejected == reasons


def test_without_skip_invalid_the_first_bad_ref_refuses_the_job(settings: Settings) -> None:
    with pytest.raises(RefRefused, match="IMGQ_ALLOWED_BUCKETS"):
        list(accept_refs(["s3://photos/a.jpg", "s3://other/a.jpg"], settings, skip_invalid=False, rejected=[]))
