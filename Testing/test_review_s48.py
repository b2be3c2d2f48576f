"""Session 48: faults found by this session's trials and reviews."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch

from PAMSegmentLib.checkpoints import CheckpointError, load_checkpoint_file


def test_a_torchscript_archive_is_named_with_how_to_save_its_weights(tmp_path):
    """A TorchScript file (torch.jit.save) was told "its entry ts/code/... is compressed ... re-save the
    weights with torch.save", which says nothing of what it is. It is named, with the one line that
    saves its weights as a state dict (checked here to give the tensors a state dict holds)."""
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    with pytest.raises(CheckpointError, match=r"it is a TorchScript archive \(torch\.jit\.save\)") as error:
        load_checkpoint_file(path)
    assert "torch.save(torch.jit.load(PATH).state_dict(), 'weights.pth')" in str(error.value)
    saved = torch.jit.load(str(path)).state_dict()  # the advice, run
    assert sorted(saved) == ["0.bias", "0.weight"] and torch.equal(saved["0.weight"], module[0].weight)


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_tar_archive_is_told_to_be_extracted_not_called_an_error_page(tmp_path):
    """A checkpoint packed in a .tar was "not a PyTorch file (it begins './PaxHeader'...) ... the download
    may have saved an error page". It is named as a tar archive to extract; torch's own tar format from
    before 0.4 (its first member sys_info) is named as that."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    _tar(tmp_path / "weights.tar", [("pam.pth", buffer.getvalue())])
    with pytest.raises(CheckpointError, match=r"it is a tar archive, not a PyTorch checkpoint; extract it "
                                              r"\(tar -xf 'weights.tar'"):
        load_checkpoint_file(tmp_path / "weights.tar")
    _tar(tmp_path / "old.pt", [("sys_info", b"\x80\x02}q\x00."), ("pickle", b"\x80\x02}q\x00."),
                               ("storages", b"\x80\x02K\x00."), ("tensors", b"\x80\x02K\x00.")])
    with pytest.raises(CheckpointError, match=r"it is in the tar format of torch before 0\.4"):
        load_checkpoint_file(tmp_path / "old.pt")


def test_the_checkpoint_checked_is_the_checkpoint_loaded(tmp_path, small_checkpoint, monkeypatch):
    """The file was opened for its checks (zip directory, CRC-32 of every entry) and opened again by
    torch.load: a file put in its place in between escaped the CRC check (ours also carry a sha256, the
    official file nothing). It is opened once now; here a damaged copy replaces it right after the
    checks, and the weights loaded are the checked file's (the code before refused the copy's sha256)."""
    import os
    import shutil

    from PAMSegmentLib import checkpoints

    path = tmp_path / "weights.pt"
    shutil.copyfile(small_checkpoint.path, path)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # a byte in a weight: caught by the CRC check when checked
    (tmp_path / "other.pt").write_bytes(bytes(damaged))
    checked = checkpoints._check_zip_entries

    def check_then_swap(*args):
        checked(*args)
        os.replace(tmp_path / "other.pt", path)

    monkeypatch.setattr(checkpoints, "_check_zip_entries", check_then_swap)
    model = load_checkpoint_file(path)
    assert not (tmp_path / "other.pt").exists()  # the swap happened
    assert model.sha256 == small_checkpoint.sha256
    assert all(torch.equal(a, b) for a, b in zip(model.network.state_dict().values(),
                                                 small_checkpoint.network.state_dict().values()))
