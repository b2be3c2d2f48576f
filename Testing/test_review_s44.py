"""Session 44."""

from __future__ import annotations


def test_attended_skips_of_a_single_slice_stay_channels_last_into_the_decoder(monkeypatch):
    """Session 44: at batch 1 a skip that went through the cross-attention came back with a batch
    stride of C (a (1, 1, C, h, w) view reshaped), which torch's ``cat`` does not take for
    channels-last: the decoder's concatenations fell back to the plain layout (6 times as slow there)
    and its next convolutions copied them back. Every decoder stage now gets a dense channels-last
    map, and the network's output is unchanged (the same values to the bit as without the restride)."""
    import torch

    from PAMSegmentLib import network
    from PAMSegmentLib.checkpoints import _for_inference
    from PAMSegmentLib.network import build_network, fuse_scales

    monkeypatch.delenv("PAMSEGMENT_CHANNELS_LAST", raising=False)
    torch.manual_seed(0)
    net = _for_inference(build_network("small"), "cpu")
    stage = net.proposing_stage
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        (tuple(args[0].shape), args[0].stride(), args[0].is_contiguous(memory_format=torch.channels_last))))
        for m in stage.decoder.stages]
    guide, mask = torch.rand(1, 1, 128, 128), (torch.rand(1, 1, 128, 128) > 0.5).float()
    query = torch.rand(1, 1, 1, 128, 128)
    with torch.inference_mode():
        keys, values = stage.encode_guide(guide, mask)
        got = fuse_scales(stage.decode_queries(query, keys, values, mask).logits, 128)
    for h in hooks:
        h.remove()
    assert [s[0] for s in seen] == [(1, 256, 16, 16), (1, 128, 32, 32), (1, 64, 64, 64), (1, 32, 128, 128)]
    assert all(cl for _, _, cl in seen), seen
    assert [s[1][0] for s in seen] == [256 * 16 * 16, 128 * 32 * 32, 64 * 64 * 64, 32 * 128 * 128]
    monkeypatch.setattr(network, "_dense_batch_stride", lambda x: x)
    with torch.inference_mode():
        want = fuse_scales(stage.decode_queries(query, keys, values, mask).logits, 128)
    assert torch.equal(got, want)


def test_dense_batch_stride_only_restrides_a_single_channels_last_map():
    import torch

    from PAMSegmentLib.network import _dense_batch_stride

    base = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6).contiguous(
        memory_format=torch.channels_last)
    odd = base.as_strided(base.shape, (4, 1, 24, 4))  # batch stride C: the same memory, the same values
    out = _dense_batch_stride(odd)
    assert odd.stride() == (4, 1, 24, 4) and torch.equal(odd, base)
    assert out.stride() == (120, 1, 24, 4) and torch.equal(out, base) and out.data_ptr() == base.data_ptr()
    assert _dense_batch_stride(base) is base
    plain = torch.rand(1, 4, 5, 6)
    assert _dense_batch_stride(plain) is plain  # plain order: left alone
    batch = torch.rand(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    assert _dense_batch_stride(batch) is batch
    flat = torch.rand(3, 4)
    assert _dense_batch_stride(flat) is flat


def test_a_series_without_a_uid_is_offered_with_an_empty_series_argument(tmp_path, capsys):
    """A newcomer's trial (session 44): TotalSegmentator's DICOM files carry no SeriesInstanceUID;
    beside another series in one folder, a prompt drawn on them was refused with "choose it with
    --series " and nothing after, which the command line then refused ("expected one argument").
    The messages now say --series "" (which reads them), in the refusal and in the list of series."""
    import numpy as np
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume, write_labelmap

    folder = tmp_path / "mixed"
    small, large = make_volume(shape=(4, 6, 7)), make_volume(shape=(6, 8, 9))
    write_dicom_series(folder, small, "", prefix="a")
    write_dicom_series(folder, large, "1.2.826.0.1.3680043.2.1125.44.2", prefix="b")
    drawn_on = read_volume(folder, series_uid="")
    assert drawn_on.shape == (4, 6, 7)
    prompt = np.zeros(drawn_on.shape, np.uint8)
    prompt[2, 1:4, 1:4] = 1
    write_labelmap(prompt, drawn_on, tmp_path / "prompt.nii.gz")
    capsys.readouterr()
    args = ["propagate", str(folder), str(tmp_path / "prompt.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
            "--method", "copy"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert ("but on that of its series (files without a SeriesInstanceUID): it was drawn on that series; choose it "
            "with --series \"\" (from Python, series_uid=\"\"; a batch manifest's empty series cell reads the largest "
            "series, so there give these files a folder of their own)") in err
    assert cli.main(args + ["--series", ""]) == 0
    out = read_volume(tmp_path / "out.nii.gz")
    assert out.shape == (4, 6, 7) and np.array_equal(out.array[2], prompt[2])  # on the series drawn on
    assert cli.main(args + ["--series", "1.2.3"]) == 2
    assert ("available series: (files without a SeriesInstanceUID) (choose it with --series \"\"); "
            "1.2.826.0.1.3680043.2.1125.44.2") in capsys.readouterr().err
    on_large = np.zeros((6, 8, 9), np.uint8)
    on_large[3, 2:5, 2:5] = 1
    write_labelmap(on_large, read_volume(folder), tmp_path / "prompt_large.nii.gz")
    args[2] = str(tmp_path / "prompt_large.nii.gz")
    assert cli.main(args) == 0  # the largest series read, the other offered with how to choose it
    assert ("the other: (files without a SeriesInstanceUID) (choose it with --series \"\") (4 files). Choose "
            "another with --series UID.") in capsys.readouterr().out
