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


def save(root, step, model):
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(root, step, model, opt, sched, {"step": step}, keep_last=3)


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
