"""Checkpoint faults: a full disk mid-save leaves the previous checkpoint intact and no
partial one; an incomplete folder is never picked for resume."""

import errno
import json

import pytest
import torch

from tuneforge.errors import UserError
from tuneforge.train import checkpoint as ckpt


class TinyModel(torch.nn.Linear):
    def __init__(self, fail=False):
        super().__init__(4, 4)
        self.fail = fail

    def save_pretrained(self, folder, safe_serialization=True):
        from safetensors.torch import save_file

        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


def save(root, step, model, keep_last=3):
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, model, opt, sched, {"step": step}, keep_last=keep_last)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    first = save(root, 1, TinyModel())
    before = json.loads((first / "manifest.json").read_text())
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        save(root, 2, TinyModel(fail=True))
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no partial step_2, no temp folder
    assert ckpt.is_complete(first, verify_hashes=True)
    assert json.loads((first / "manifest.json").read_text()) == before
    assert ckpt.latest_checkpoint(root) == first


def test_incomplete_folders_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    good = save(root, 1, TinyModel())
    torn = save(root, 2, TinyModel())
    (torn / "optimizer.pt").write_bytes(b"torn")  # size no longer matches the manifest
    (root / "step_3").mkdir()  # no manifest at all
    (root / ".tmp-step_4").mkdir()
    assert ckpt.latest_checkpoint(root) == good


def _no_space_from_safetensors(monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):  # what safetensors raises on a full disk
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return TinyModel()


def _no_space_from_torch_save(monkeypatch):
    import shutil
    from collections import namedtuple

    def torch_save(*args, **kwargs):  # torch.save names no reason, only that the write failed
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 4096, 4096))
    return TinyModel()


def _no_space_from_python(monkeypatch):
    return TinyModel(fail=True)  # OSError(ENOSPC) from a plain write


@pytest.mark.parametrize("inject", [_no_space_from_python, _no_space_from_safetensors, _no_space_from_torch_save])
def test_disk_full_reads_the_same_whichever_library_raised(tmp_path, monkeypatch, inject):
    root = tmp_path / "checkpoints"
    first = save(root, 1, TinyModel())
    model = inject(monkeypatch)
    with pytest.raises(UserError) as raised:
        save(root, 2, model)
    assert raised.value.code == 2
    assert str(raised.value) == (f"could not write checkpoint {root / 'step_2'}: No space left on device "
                                 "(the previous checkpoint is intact; free disk space and --resume)")
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]
    assert ckpt.latest_checkpoint(root) == first


def test_other_errors_during_a_save_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(TypeError("cannot pickle 'generator'")))
    with pytest.raises(TypeError):
        save(tmp_path / "checkpoints", 1, TinyModel())
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_checkpoints_past_the_resumed_step_do_not_crowd_out_new_ones(tmp_path):
    """Resumed from step 2 with a (corrupt or not) step_4 still there, keep_last=1: saving
    step 3 keeps step_3 and leaves step_4 alone until step 4 is saved again."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        save(root, step, TinyModel())
    save(root, 3, TinyModel(), keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]


def test_disk_full_while_writing_final_says_what_is_left(run_config, tmp_path, monkeypatch, capsys):
    """The final save hits a full disk (safetensors' own error, raised where transformers
    calls it): one line, exit 2, naming the intact checkpoint to resume from; no partial final/."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from tuneforge.cli import main

    real_save_file = transformers.modeling_utils.safe_save_file

    def save_file(tensors, filename, metadata=None):
        if ".final.tmp-" in str(filename):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    cfg = run_config("full", train={"max_steps": 3, "save_every": 2})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (f"error: could not write the final model {tmp_path / 'full' / 'final'}: No space left on device "
            "(free disk space and --resume from step_2, which is intact)") in err
    assert [p.name for p in (tmp_path / "full").iterdir() if "final" in p.name] == []
