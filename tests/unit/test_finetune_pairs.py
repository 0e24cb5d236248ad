"""`imgq finetune`'s pairs file: what it cannot read is a bad_pairs line naming the file and line (as `imgq
enqueue` names a bad row), never an internal error."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from imgq import errors
from imgq.worker.finetune import read_pairs


def test_a_caption_past_csvs_field_limit_is_bad_pairs_naming_its_line(tmp_path: Path) -> None:
    """A caption over 128 KiB raised csv.Error: `imgq finetune` exited 70 with internal_error."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f'/x/1.jpg,ein hund\n/x/2.jpg,"{"x" * 200_000}"\n')
    with pytest.raises(errors.BadParams, match=r"pairs\.csv:2: not CSV imgq can read: field larger than") as caught:
        read_pairs(pairs)
    assert caught.value.code == "bad_pairs"


def test_a_row_is_named_by_its_line_in_the_file_and_cut_in_the_message(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text('ref,caption\n/x/1.jpg,"zwei\nzeilen"\n/x/2.jpg\n' + "/x/3.jpg," + "y," * 500 + "\n")
    with pytest.raises(errors.BadParams, match=r"pairs\.csv:4: expected two non-empty columns") as caught:
        read_pairs(pairs)
    assert len(caught.value.message) < 400 and caught.value.code == "bad_pairs"
