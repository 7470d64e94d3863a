"""`export` and `merge` never replace what the user did not name: a non-empty destination
needs --force, a destination that is, contains or lies inside the source or its run is
always refused, and a failure leaves no temp folder behind."""

import os

import pytest

from tuneforge.cli import main
from tuneforge.model.export import atomic_dir


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def lora_run(run_config, tmp_path):
    cfg = run_config("run", train={"max_steps": 2, "save_every": 1}, model={"lora": {"r": 2, "alpha": 4}})
    assert main(["train", str(cfg)]) == 0
    return tmp_path / "run"


def test_export_destinations(lora_run, tmp_path, capsys, monkeypatch):
    run, before = lora_run, listing(lora_run)
    step = run / "checkpoints" / "step_1"
    notes = tmp_path / "m"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(step), str(notes)]) == 2  # not empty: refused, notes kept
    assert "is not empty (notes.txt)" in capsys.readouterr().err
    assert (notes / "notes.txt").read_text() == "mine"
    refused = {  # always refused, with or without --force
        str(run): "contains the source",
        str(run / "final"): "is the source",
        str(run / "final" / "sub"): "is inside the source",
        str(run / "exported"): "is inside the run",
        str(tmp_path): "contains the source",
    }
    for dest, message in refused.items():
        for force in ([], ["--force"]):
            assert main(["export", str(run / "final"), dest, *force]) == 2, dest
            assert message in capsys.readouterr().err, dest
    monkeypatch.chdir(run)
    assert main(["export", "final", "."]) == 2  # the EBUSY case of the issue: "." is the run
    assert "contains the source" in capsys.readouterr().err
    assert listing(run) == before  # nothing written into, or deleted from, the run
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(step), str(empty)]) == 0  # an empty folder is fine
    assert (empty / "adapter_config.json").is_file()
    assert main(["export", str(step), str(notes), "--force"]) == 0  # --force replaces it whole
    assert (notes / "adapter_config.json").is_file() and not (notes / "notes.txt").exists()
    file_dest = tmp_path / "a_file"
    file_dest.write_text("x")
    assert main(["export", str(step), str(file_dest)]) == 2
    assert file_dest.read_text() == "x"


def test_merge_destinations(lora_run, tmp_path, tiny_model_dir, capsys):
    adapter = lora_run / "final"
    base_before = listing(tiny_model_dir)
    assert main(["merge", str(tiny_model_dir), str(adapter), str(tiny_model_dir), "--force"]) == 2
    assert "is the source" in capsys.readouterr().err
    assert main(["merge", str(tiny_model_dir), str(adapter), str(tiny_model_dir.parent), "--force"]) == 2
    assert "contains the source" in capsys.readouterr().err
    assert main(["merge", str(tiny_model_dir), str(adapter), str(lora_run / "merged")]) == 2
    assert "is inside the run" in capsys.readouterr().err
    assert listing(tiny_model_dir) == base_before
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(tiny_model_dir), str(adapter), str(out)]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(tiny_model_dir), str(adapter), str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_atomic_dir_failure_leaves_no_temp_and_keeps_the_old(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed mid-write")
    assert listing(tmp_path) == ["out", "out/old.txt"]

    real_rename = os.rename

    def rename_fails_into_place(src, dst):  # the final rename fails (as EBUSY did)
        if ".tmp-" in str(src):
            raise OSError(16, "Device or resource busy")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_into_place)
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert listing(tmp_path) == ["out", "out/old.txt"]  # the old one is back, no .tmp-/.old- left
