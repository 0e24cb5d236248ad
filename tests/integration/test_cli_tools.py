"""The developer and model tools of the CLI refuse bad input in one line, exit 2, and touch nothing
they did not write: `dev tiny-model` never deletes a folder that is not its own checkpoint, `db
upgrade` says where the database really is, `finetune` names a bad pairs file as `enqueue` does,
`search --model` of a caption checkpoint is one line naming --model, and `explain --out` creates its
folder only once the request is valid and replaces only its own earlier files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from imgq.cli import app
from tests.fixtures import warm_start

pytest.importorskip("torch")

# Nothing listens on port 1: a command that got as far as connecting would fail with exit 1, not 2.
ENV = {"IMGQ_DATABASE_URL": "postgresql+psycopg://u:p@127.0.0.1:1/none", "IMGQ_BROKER_URL": "redis://127.0.0.1:1/0"}


def _main(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point (its one-line errors, transformers' own log handler on the real stderr)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")} | ENV | (env or {})
    return warm_start.run("imgq.cli", list(args), base, timeout=120, cwd=cwd)


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# -- 1. dev tiny-model ------------------------------------------------------------------------------


def _someones_folder(folder: Path) -> dict[str, bytes | None]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('mine')\n")
    return _tree(folder)


def test_tiny_model_refuses_a_non_empty_folder_that_holds_no_tiny_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    before = _someones_folder(folder)
    out = _main("dev", "tiny-model", str(folder))
    assert out.returncode == 2, out.stderr
    assert out.stderr == (f"error[bad_file]: {folder} is not empty and holds no tiny checkpoint; choose an empty "
                          "or new folder\n")
    assert out.stdout == ""
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no staging folder left beside it


def test_tiny_model_dot_never_wipes_the_current_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cwd"
    before = _someones_folder(folder)
    out = _main("dev", "tiny-model", ".", "--kind", "retrieval", cwd=folder)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error[bad_file]: . is not empty and holds no tiny checkpoint")
    assert len(out.stderr.splitlines()) == 1
    assert _tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]


@pytest.mark.parametrize("where", ["file", "under_a_file", "unwritable"])
def test_tiny_model_of_a_path_it_cannot_use_is_bad_file(tmp_path: Path, where: str) -> None:
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    if where == "unwritable" and not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    target = {"file": file, "under_a_file": file / "ckpt", "unwritable": Path("/proc/imgq-none/ckpt")}[where]
    out = _main("dev", "tiny-model", str(target))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error[bad_file]: ") and len(out.stderr.splitlines()) == 1, out.stderr
    assert str(target if where == "file" else target.parent) in out.stderr
    assert "internal_error" not in out.stderr and "Error:" not in out.stderr
    assert file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def _writers() -> list[Any]:
    from imgq.worker.tiny import write_tiny_checkpoint, write_tiny_retrieval_checkpoint
    from imgq.worker.tiny_translate import write_tiny_translation_checkpoint

    return [write_tiny_checkpoint, write_tiny_retrieval_checkpoint, write_tiny_translation_checkpoint]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_every_tiny_writer_refuses_a_folder_that_is_not_its_checkpoint(tmp_path: Path, index: int) -> None:
    from imgq.worker.tiny import CheckpointFolderError

    write = _writers()[index]
    folder = tmp_path / "project"
    before = _someones_folder(folder)
    with pytest.raises(CheckpointFolderError, match="is not empty and holds no tiny checkpoint"):
        write(folder)
    assert _tree(folder) == before
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    with pytest.raises(CheckpointFolderError, match="is not a folder"):
        write(file)
    assert file.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "project"]


def test_tiny_model_writes_into_an_empty_folder_and_replaces_only_its_own_checkpoint(tmp_path: Path) -> None:
    from imgq.worker.tiny import MARKER, write_tiny_checkpoint, write_tiny_retrieval_checkpoint

    folder = tmp_path / "empty"
    folder.mkdir()
    inode = folder.stat().st_ino
    out = _main("dev", "tiny-model", str(folder), "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{folder}\n"
    assert (folder / MARKER).is_file() and folder.stat().st_ino == inode  # written into it, not swapped
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_checkpoint(folder, seed=1) == folder  # reused
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    write_tiny_retrieval_checkpoint(folder)  # its own earlier checkpoint, of another kind: replaced
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BlipForImageTextRetrieval"]
    assert json.loads((folder / MARKER).read_text())["kind"] == "retrieval"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_replacement_cut_short_is_never_reused_as_complete(tmp_path: Path, monkeypatch) -> None:
    import imgq.worker.tiny as tiny

    folder = tmp_path / "ckpt"
    tiny.write_tiny_checkpoint(folder, seed=0)
    real_replace, moved = os.replace, []

    def interrupted(src: Any, dst: Any) -> None:
        moved.append(dst)
        if len(moved) == 2:  # Ctrl-C while the new files move in
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(tiny.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny.write_tiny_checkpoint(folder, seed=1)
    monkeypatch.setattr(tiny.os, "replace", real_replace)
    # The earlier settings again: the folder must be written anew, not handed back half empty.
    assert tiny.write_tiny_checkpoint(folder, seed=0) == folder
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / tiny.MARKER).read_text())["seed"] == 0


# -- 2. db upgrade ----------------------------------------------------------------------------------


def _head() -> str:
    from alembic.script import ScriptDirectory

    from imgq.db.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config("postgresql://x/y")).get_current_head()


def _current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@pytest.mark.integration
def test_db_upgrade_reports_the_revision_the_database_is_at(database_url: str) -> None:
    from alembic import command

    from imgq.db.migrate import alembic_config

    head = _head()
    env = {"IMGQ_DATABASE_URL": database_url}
    for older in ("0001", "base"):
        out = CliRunner().invoke(app, ["db", "upgrade", older], env=env)
        assert out.exit_code == 0, out.output
        assert out.stderr == f"database at {head} (already past {older}: `upgrade` never downgrades)\n"
        assert _current(database_url) == head
    same = CliRunner().invoke(app, ["db", "upgrade"], env=env)
    assert same.exit_code == 0 and same.stderr == f"database at {head} (already there: nothing to do)\n"

    command.downgrade(alembic_config(database_url), "0010")
    step = CliRunner().invoke(app, ["db", "upgrade", "0012"], env=env)
    assert step.exit_code == 0, step.output
    assert step.stderr == "database at 0012 (upgraded from 0010)\n" and _current(database_url) == "0012"
    command.downgrade(alembic_config(database_url), "base")
    whole = CliRunner().invoke(app, ["db", "upgrade"], env=env)
    assert whole.exit_code == 0, whole.output
    assert whole.stderr == f"database at {head} (upgraded from an empty database)\n"
    assert _current(database_url) == head
    beyond = CliRunner().invoke(app, ["db", "upgrade", "+99"], env=env)  # relative: resolved against the database
    assert beyond.exit_code == 2 and beyond.stderr.startswith("error[bad_revision]: unknown revision '+99'")
    assert len(beyond.stderr.splitlines()) == 1 and _current(database_url) == head


@pytest.mark.integration
def test_db_upgrade_of_a_database_a_newer_imgq_migrated_says_so(database_url: str) -> None:
    from sqlalchemy import text

    from imgq.db.store import make_engine

    head, engine = _head(), make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        out = CliRunner().invoke(app, ["db", "upgrade"], env={"IMGQ_DATABASE_URL": database_url})
        assert out.exit_code == 1, out.output
        assert out.stderr.startswith("error[db_newer]: the database is at revision 0099_future, which this imgq's "
                                     f"migrations (0001 to {head}) do not have: a newer imgq migrated it")
        assert len(out.stderr.splitlines()) == 1 and _current(database_url) == "0099_future"
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :head"), {"head": head})
        engine.dispose()


@pytest.mark.parametrize("revision", ["bogusrev", "9999"])
def test_db_upgrade_to_an_unknown_revision_is_bad_input_naming_it(revision: str) -> None:
    out = _main("db", "upgrade", revision)  # refused before Postgres (unreachable here) is asked
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error[bad_revision]: unknown revision {revision!r}"), out.stderr
    assert len(out.stderr.splitlines()) == 1 and "CommandError" not in out.stderr


# -- 3. finetune's pairs file ----------------------------------------------------------------------


def _finetune(pairs: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return _main("finetune", "--pairs", str(pairs), "--out", str(tmp_path / "adapter"), "--lang", "de")


def test_finetune_names_an_unreadable_pairs_file_and_a_bad_row_as_enqueue_does(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    out = _finetune(missing, tmp_path)  # refused before Postgres (unreachable here) is asked about the name
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error[bad_file]: cannot read {missing}: No such file or directory\n"
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"/x/1.jpg,\xff\xfe\n")
    out = _finetune(binary, tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error[bad_file]: cannot read {binary}: not UTF-8"), out.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("ref,caption\n/x/1.jpg,ein hund\n/x/2.jpg\n")
    out = _finetune(bad, tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error[bad_pairs]: {bad}:3: expected two non-empty columns ref,caption"), out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "adapter").exists()


def test_finetune_read_pairs_errors_carry_the_enqueue_codes(tmp_path: Path) -> None:
    from imgq import errors
    from imgq.worker.finetune import read_pairs

    with pytest.raises(errors.InvalidRequest) as unreadable:
        read_pairs(tmp_path / "missing.csv")
    assert unreadable.value.code == "bad_file"
    empty = tmp_path / "empty.csv"
    empty.write_text("ref,caption\n")
    with pytest.raises(errors.InvalidRequest, match="holds no ref,caption pairs") as nothing:
        read_pairs(empty)
    assert nothing.value.code == "bad_pairs"


# -- 4. search --model of a caption checkpoint -----------------------------------------------------


def test_search_with_a_caption_checkpoint_as_model_is_one_line_naming_model(tiny_model_dir: Path) -> None:
    out = _main("search", "a dog", "--model", str(tiny_model_dir))
    assert out.returncode == 1, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr[:2000]
    assert "LOAD REPORT" not in out.stderr and "\x1b" not in out.stderr
    line = out.stderr.strip()
    assert line.startswith("error[model_unavailable]: cannot load retrieval model") and "vision_proj" in line
    assert "--model" in line and "IMGQ_EMBED_MODEL" not in line
    # Chosen by the setting, it names the setting, still in one line.
    by_setting = _main("search", "a dog", env={"IMGQ_EMBED_MODEL": str(tiny_model_dir)})
    assert by_setting.returncode == 1 and len(by_setting.stderr.splitlines()) == 1, by_setting.stderr[:2000]
    assert "IMGQ_EMBED_MODEL" in by_setting.stderr and "--model" not in by_setting.stderr


# -- 5. explain --out -------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(root / "a.png")
    (root / "not-an-image.png").write_bytes(b"hello, not a picture")
    return root


def _explain_env(photos: Path, tiny_model_dir: Path) -> dict[str, str]:
    return {"IMGQ_LOCAL_ROOTS": str(photos), "IMGQ_CAPTION_MODEL": str(tiny_model_dir), "IMGQ_DEVICE": "cpu"}


@pytest.mark.parametrize("case", ["missing", "bad_layer", "not_an_image"])
def test_explain_creates_no_folder_for_a_refused_request(photos: Path, tiny_model_dir: Path, tmp_path: Path,
                                                         case: str) -> None:
    out = tmp_path / "deep" / "out"
    ref, extra = {"missing": (photos / "nope.png", []), "bad_layer": (photos / "a.png", ["--layer", "9"]),
                  "not_an_image": (photos / "not-an-image.png", [])}[case]
    result = CliRunner().invoke(app, ["explain", str(ref), "--out", str(out), *extra],
                                env=_explain_env(photos, tiny_model_dir))
    assert result.exit_code in (1, 2), result.output
    assert result.stderr.startswith("error[") and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "deep").exists()


def test_explain_into_a_used_folder_replaces_only_its_own_earlier_files(photos: Path, tiny_model_dir: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = _explain_env(photos, tiny_model_dir)
    first = CliRunner().invoke(app, ["explain", str(photos / "a.png"), "--out", str(out), "--max-new-tokens", "6"],
                               env=env)
    assert first.exit_code == 0, first.output
    assert len(list(out.glob("word-*.png"))) >= 5
    mine = {"notes.txt": b"mine", "word-list.txt": b"mine", "photo.png": b"mine", "explain.json.bak": b"mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    (out / "word-00-keep").mkdir()  # a folder is never a file explain wrote
    second = CliRunner().invoke(app, ["explain", str(photos / "a.png"), "--out", str(out), "--max-new-tokens", "2"],
                                env=env)
    assert second.exit_code == 0, second.output
    doc = json.loads((out / "explain.json").read_text())
    assert {p.name for p in out.glob("word-*.png")} == {w["overlay"] for w in doc["words"]}
    assert len(doc["words"]) <= 2
    assert all((out / name).read_bytes() == data for name, data in mine.items())
    assert (out / "word-00-keep").is_dir() and (out / "contact_sheet.png").is_file()


def test_explain_takes_enqueues_sampling_flags_as_the_same_params(photos: Path, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    """`imgq explain` had only four of enqueue's caption flags: --sample, --seed, --top-k ... were
    `No such option` (the README says it takes enqueue's caption options)."""
    env = _explain_env(photos, tiny_model_dir)
    image = str(photos / "a.png")
    flags = CliRunner().invoke(app, ["explain", image, "--out", str(tmp_path / "f"), "--sample", "--seed", "3",
                                     "--top-k", "5", "--temperature", "1.5", "--min-new-tokens", "4"], env=env)
    assert flags.exit_code == 0, flags.output
    as_json = CliRunner().invoke(app, ["explain", image, "--out", str(tmp_path / "j"), "--params",
                                       '{"do_sample": true, "seed": 3, "top_k": 5, "temperature": 1.5, '
                                       '"min_new_tokens": 4}'], env=env)
    assert as_json.exit_code == 0, as_json.output
    greedy = CliRunner().invoke(app, ["explain", image, "--out", str(tmp_path / "g"), "--min-new-tokens", "4"],
                                env=env)
    assert flags.stdout == as_json.stdout != greedy.stdout  # the flags reached the sampler


@pytest.mark.parametrize("command", ["explain", "enqueue"])
def test_a_params_key_that_is_a_flags_name_says_which_keys_there_are(photos: Path, tiny_model_dir: Path,
                                                                     tmp_path: Path, command: str) -> None:
    """{"sample": true} was `--sample: Extra inputs are not permitted` (a flag that exists) or
    `sample apply to none of the kinds caption`; neither named do_sample."""
    args = ["explain", str(photos / "a.png"), "--out", str(tmp_path / "o")] if command == "explain" else \
        ["enqueue", "caption", str(photos / "a.png")]
    result = CliRunner().invoke(app, [*args, "--params", '{"sample": true}'], env=_explain_env(photos, tiny_model_dir))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error[bad_params]: invalid parameters: 'sample' is not a parameter of caption; its "
                           "--params keys are ") and "do_sample" in line, line


def test_explain_out_of_an_existing_file_is_bad_file_before_the_model_loads(photos: Path, tmp_path: Path) -> None:
    file = tmp_path / "taken"
    file.write_text("keep me")
    env = {"IMGQ_LOCAL_ROOTS": str(photos), "IMGQ_CAPTION_MODEL": str(tmp_path / "no-model"), "IMGQ_DEVICE": "cpu"}
    for out in (file, file / "sub"):
        result = CliRunner().invoke(app, ["explain", str(photos / "a.png"), "--out", str(out)], env=env)
        assert result.exit_code == 2, result.output
        where = "" if out == file else f": {file}"
        assert result.stderr == f"error[bad_file]: --out {out}{where} is not a folder\n"
    assert file.read_text() == "keep me"


# -- 6. help ----------------------------------------------------------------------------------------


def _commands(command: Any, path: str = "imgq") -> list[tuple[str, Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):  # a group (typer may bring its own copy of click's classes)
        for name, sub in command.commands.items():
            found += _commands(sub, f"{path} {name}")
    return found


@pytest.mark.parametrize("prefix", ["imgq dev", "imgq db", "imgq explain", "imgq search", "imgq finetune"])
def test_every_positional_argument_of_these_commands_has_help(prefix: str) -> None:
    commands = [(p, c) for p, c in _commands(typer.main.get_command(app)) if p == prefix or p.startswith(prefix + " ")]
    assert commands
    for path, command in commands:
        for param in command.params:
            if param.param_type_name == "argument":
                assert getattr(param, "help", None), f"{path}: argument {param.name} has no help"
