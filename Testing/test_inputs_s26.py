"""Inputs found unsafe or unclear in session 26's reviews."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from PAMSegmentLib import cli, volumes
from PAMSegmentLib.errors import InputError


def _nifti_declaring(tmp_path, name: str, shape_kji: tuple[int, int, int], full_data: bool) -> str:
    """A gzipped NIfTI whose header declares ``shape_kji`` uint8 voxels; with ``full_data`` the
    stream holds them all (zeros compress to almost nothing), else only a 4 x 4 x 4 block."""
    small = tmp_path / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.uint8)), str(small))
    data = bytearray(small.read_bytes())
    k, j, i = shape_kji
    struct.pack_into("<4h", data, 40, 3, i, j, k)
    if full_data:
        data = data[:352] + bytes(i * j * k)
    path = tmp_path / name
    with gzip.open(path, "wb") as f:
        f.write(bytes(data))
    return str(path)


def test_a_file_declaring_more_voxels_than_memory_holds_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A small .nii.gz whose header declares 64 x 64 x 64 voxels, all of them in the stream: ITK
    allocated them (a file of 8 MB declaring 2000^3 took 8 GB, then 32 GB as float32: the OS
    killed the process). Now the header is compared with the machine's memory first; here the
    memory is made 512 KB (1 MB would be needed as float32), then 2 MB (read as usual)."""
    path = _nifti_declaring(tmp_path, "bomb.nii.gz", (64, 64, 64), full_data=True)
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 512 * 1024)
    with pytest.raises(InputError, match=r"bomb.nii.gz's header declares 64 x 64 x 64 = 262,144 voxels, 0 GB as "
                                         r"float32, more than this machine's 0 GB of memory: if the file is what it "
                                         r"should be, crop or downsample it"):
        volumes.read_volume(path)
    with pytest.raises(InputError, match="header declares 64 x 64 x 64"):
        volumes.read_labelmap(path)
    monkeypatch.setattr(volumes, "physical_memory_bytes", lambda: 2 * 1024 * 1024)
    assert volumes.read_volume(path).shape == (64, 64, 64)


def test_the_command_line_refuses_a_bomb_with_one_line(tmp_path, capsys):
    """30000^3 voxels declared (about 100 TB as float32: more than any machine holds) in 89 bytes."""
    bomb = _nifti_declaring(tmp_path, "bomb.nii.gz", (30000, 30000, 30000), full_data=False)
    prompt = _nifti_declaring(tmp_path, "prompt.nii.gz", (30000, 30000, 30000), full_data=False)  # its grid
    assert cli.main(["propagate", bomb, prompt, "-o", str(tmp_path / "out.nii.gz"), "--method", "copy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bomb.nii.gz's header declares 30000 x 30000 x 30000 = 27,000,000,000,000 voxels" in err[0]
    assert not (tmp_path / "out.nii.gz").exists()
