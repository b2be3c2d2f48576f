"""The network's published layout and checkpoint loading: strict, safe, with clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from PAMSegmentLib.checkpoints import (
    describe_checkpoint,
    load_checkpoint_file,
    load_model,
    save_checkpoint,
    weights_sha256,
)
from PAMSegmentLib.errors import CheckpointError
from PAMSegmentLib.network import PAMNetwork
from PAMSegmentLib.preprocess import PreprocessingParams

DATA = Path(__file__).resolve().parent / "data"
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models"


def _inputs(size: int, n_queries: int = 1, seed: int = 0):
    """guide (1, 1, S, S), its mask, queries (1, N, 1, S, S): a fixed random input."""
    g = torch.Generator().manual_seed(seed)
    guide = torch.rand(1, 1, size, size, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, size, size, generator=g) > 0.6).float()
    queries = torch.rand(1, n_queries, 1, size, size, generator=g) * 2 - 1
    return guide, mask, queries


def _outputs(net: PAMNetwork, size: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        return net.eval()(*_inputs(size)).logits


def _assert_same_outputs(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Same logits to float32 rounding (loaded for inference, the weights are channels-last on the
    CPU and oneDNN sums in another order: up to ~2e-5 apart on logits of order 1)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- network layout


def test_official_state_dict_matches_published_layout():
    expected = json.loads((DATA / "pam_official_state_dict.json").read_text())
    sd = PAMNetwork("official").state_dict()
    assert len(expected) == 408
    assert sorted(sd) == sorted(expected)
    wrong = {k: (list(sd[k].shape), v) for k, v in expected.items() if list(sd[k].shape) != v}
    assert not wrong


def test_small_preset_output_shapes():
    net = PAMNetwork("small").eval()
    s = net.config.input_size
    guide, mask, queries = _inputs(s, n_queries=3)
    with torch.inference_mode():
        out = net(guide, mask, queries)
        prob, presence = net.predict(guide, mask, queries)
    assert out.logits[0].shape == (3, 2, s, s)  # largest scale first
    assert [lg.shape[-1] for lg in out.logits] == sorted((lg.shape[-1] for lg in out.logits), reverse=True)
    assert prob.shape == (3, s, s) and float(prob.min()) >= 0 and float(prob.max()) <= 1
    assert presence.shape == (3,)


# ----------------------------------------------------------------------------- official checkpoints


def test_official_checkpoint_loads_strictly_and_reproduces_outputs(official_checkpoint):
    model = load_checkpoint_file(official_checkpoint.path)
    assert model.kind == "official"
    assert model.config.name == "official"
    # A fresh network has different random weights; the loaded one must equal the saved one, bit for bit.
    saved = official_checkpoint.network.state_dict()
    loaded = model.network.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # Loaded for inference, the weights are in channels-last order on the CPU (oneDNN's faster path),
    # which sums in another order: the same outputs to float32 rounding.
    assert model.network.proposing_stage.encoder.stages[1][0].convs[0].conv.weight.is_contiguous(
        memory_format=torch.channels_last)
    got = _outputs(model.network, 224)
    want = _outputs(official_checkpoint.network, 224)
    assert len(got) == len(want)
    _assert_same_outputs(got, want)


def test_official_plain_state_dict_without_prefix_loads(tmp_path, official_checkpoint):
    path = tmp_path / "plain.pth"
    torch.save(official_checkpoint.network.state_dict(), path)
    model = load_checkpoint_file(path)
    a, b = model.network.state_dict(), official_checkpoint.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape", "twice"])
def test_official_checkpoint_with_wrong_keys_names_them(tmp_path, official_checkpoint, damage):
    sd = {"module." + k: v for k, v in official_checkpoint.network.state_dict().items()}
    victim = "proposing_stage.cross_attns.2.keys.weight"
    if damage == "missing":
        del sd["module." + victim]
        phrase = f"1 missing key(s): {victim}"
    elif damage == "unexpected":
        sd["module.proposing_stage.box_head.weight"] = torch.zeros(3)
        phrase = "1 unexpected key(s): proposing_stage.box_head.weight"
    elif damage == "shape":
        sd["module." + victim] = torch.zeros(7, 7)
        phrase = f"shape mismatch(es), e.g. {victim}: file (7, 7) vs network (512, 512)"
    else:  # "x" and "module.x" both present: the last one silently won
        sd[victim] = torch.zeros(512, 512)
        phrase = f"holds weight {victim} twice (with and without 'module.')"
    path = tmp_path / "damaged.pth"
    torch.save({"model_state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)


def test_names_of_one_weight_must_hold_equal_values(tmp_path, official_checkpoint):
    """The official layout names many weights several times (the decoder's encoder, the
    all_modules.* aliases); loading copies each name into the same tensor, so a file whose copies
    differ (damaged or edited) loaded the last one silently."""
    sd = torch.load(official_checkpoint.path, weights_only=True)["model_state_dict"]
    name = "module.proposing_stage.decoder.encoder.stages.0.0.convs.0.conv.bias"
    assert name in sd and torch.equal(sd[name], sd[name.replace("decoder.encoder.", "encoder.")])
    sd[name] = sd[name] + 1.0
    torch.save({"model_state_dict": sd}, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"holds different values under .*encoder\.stages\.0\.0\.convs\.0\.conv"
                                              r"\.bias and .*, which name the same weight: the file is damaged"):
        load_checkpoint_file(tmp_path / "edited.pth")


# ----------------------------------------------------------------------------- files that are no checkpoint


def test_truncated_checkpoint(tmp_path, small_checkpoint):
    data = small_checkpoint.path.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as err:
        load_checkpoint_file(path)
    assert str(err.value).endswith("download or copy it again")  # was cut inside torch's sentence ("If yo")


def test_compressed_zip_entries_are_refused_before_they_are_inflated(tmp_path, small_checkpoint):
    """torch.load inflates a deflated entry in full before any check: a 1 MB file of deflated zeros
    asked for 1 GiB (4 MB for 4 GiB). torch.save never compresses, so such a file is refused from
    its zip directory alone; so is one whose entries declare more than the size limit."""
    import zipfile

    from PAMSegmentLib import checkpoints

    with zipfile.ZipFile(small_checkpoint.path) as src, \
            zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    with pytest.raises(CheckpointError, match=r"its entry '.*' is compressed, which torch.save never does"):
        load_checkpoint_file(tmp_path / "deflated.pt")
    # the same file stored as torch writes it loads
    with zipfile.ZipFile(small_checkpoint.path) as src, \
            zipfile.ZipFile(tmp_path / "stored.pt", "w", zipfile.ZIP_STORED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    assert load_checkpoint_file(tmp_path / "stored.pt").sha256 == load_checkpoint_file(small_checkpoint.path).sha256
    with zipfile.ZipFile(tmp_path / "stored.pt") as archive:
        total = sum(e.file_size for e in archive.infolist())
    checkpoints.MAX_CHECKPOINT_BYTES, limit = total - 1, checkpoints.MAX_CHECKPOINT_BYTES
    try:  # entries declaring more than the limit (checked on the directory, before torch.load)
        with pytest.raises(CheckpointError, match=r"its entries declare .* GB, more than any PAM checkpoint holds"):
            with open(tmp_path / "stored.pt", "rb") as f:
                checkpoints._check_zip_entries(tmp_path / "stored.pt", f)
    finally:
        checkpoints.MAX_CHECKPOINT_BYTES = limit


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_checkpoint_file(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint_file(tmp_path)


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": [0.1, 0.01]}, path)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_checkpoint_file(path)


def test_weights_under_another_name_or_our_bare_state_dict_say_what_the_file_is(tmp_path, small_checkpoint):
    """{'state_dict': sd} got "holds no state dict" without what the file holds; our own network's
    bare state dict was called a broken official checkpoint (73 missing, 4 unexpected keys)."""
    sd = small_checkpoint.network.state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match=r"holds no state dict \(expected tensors, or a 'model_state_dict' "
                                              r"entry; it holds a mapping of 'state_dict', 'epoch'\): if its "
                                              r"weights sit under"):
        load_checkpoint_file(tmp_path / "wrapped.pth")
    for name, saved in (("bare.pth", sd), ("under.pth", {"model_state_dict": sd})):
        torch.save(saved, tmp_path / name)
        with pytest.raises(CheckpointError, match=r"is the bare state dict of a PAMSegment network .*save_checkpoint"):
            load_checkpoint_file(tmp_path / name)


class _Payload:
    """Unpickling this would create ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_arbitrary_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="Python objects beyond tensors") as err:
        load_checkpoint_file(path)
    assert not marker.exists()
    # the message names what was refused and how a user who trusts the file goes on
    assert "(here posix.mkdir)" in str(err.value) or "(here os.mkdir)" in str(err.value), str(err.value)
    assert "if you trust the file, save its weights alone once in Python" in str(err.value)


# ----------------------------------------------------------------------------- our format


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(7)
    net = PAMNetwork("small").eval()
    path = tmp_path / "ours.pt"
    digest = save_checkpoint(path, net, PreprocessingParams(input_size=128, window_margin=0.1),
                             provenance={"command": "scripts/train.py --epochs 1"})
    model = load_model(path)
    assert model.kind == "pamsegment"
    assert model.config == net.config
    assert model.preprocessing.window_margin == 0.1
    assert model.provenance == {"command": "scripts/train.py --epochs 1"}
    assert model.sha256 == digest
    # Aliased entries (conv.weight / all_modules.0.weight) are stored once: ~4 bytes a parameter.
    assert path.stat().st_size < 4 * net.n_parameters() * 1.1 + 100_000
    saved = net.state_dict()
    assert all(torch.equal(model.network.state_dict()[k], saved[k]) for k in saved)
    _assert_same_outputs(_outputs(model.network, 128), _outputs(net, 128))
    # The file does not store the decoder's alias of the encoder twice, but the loaded network
    # has it (shared tensors), as the network's own state dict does.
    assert model.network.proposing_stage.decoder.encoder is model.network.proposing_stage.encoder


def test_own_format_sha256_matches_recomputed(small_checkpoint):
    payload = torch.load(small_checkpoint.path, weights_only=True)
    assert payload["format"] == "pamsegment-checkpoint"
    assert payload["sha256"] == weights_sha256(payload["state_dict"]) == small_checkpoint.sha256
    assert load_checkpoint_file(small_checkpoint.path).sha256 == small_checkpoint.sha256


def test_own_format_tampered_weights_are_corrupt(tmp_path, small_checkpoint):
    payload = torch.load(small_checkpoint.path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1e-3
    path = tmp_path / "tampered.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint_file(path)


@pytest.mark.parametrize("edit, phrase", [
    (lambda p: p["state_dict"].pop("proposing_stage.mask_encoder.stages.0.0.convs.0.conv.weight"),
     "missing key(s): proposing_stage.mask_encoder.stages.0.0.convs.0.conv.weight"),
    (lambda p: p["config"].update(base_features=8), "shape mismatch"),
    (lambda p: p["config"].update(depth=3), "invalid header: unknown network config field(s): depth"),
    (lambda p: p.update(format_version=99), "format version 99"),
    (lambda p: p.update(format_version="1"), "invalid header: format_version '1'"),
    (lambda p: p["state_dict"].update(extra=[1, 2]), "has no state_dict of tensors"),
])
def test_own_format_header_and_key_errors(tmp_path, small_checkpoint, edit, phrase):
    payload = torch.load(small_checkpoint.path, weights_only=True)
    edit(payload)
    if all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        payload["sha256"] = weights_sha256(payload["state_dict"])  # only the edit is wrong
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert phrase in str(err.value)


def _first_weight(payload):
    return next(k for k, v in payload["state_dict"].items() if v.dim() == 4)


@pytest.mark.parametrize("edit, phrase", [
    # Silently wrong results before: NaN weights loaded and propagation wrote only the drawn slice.
    (lambda p, k: p["state_dict"][k].view(-1).__setitem__(0, float("nan")), "holds NaN or infinite values"),
    (lambda p, k: p["state_dict"].update({k: p["state_dict"][k].to(torch.int32)}), "has dtype torch.int32"),
    # A few bytes on disk, gigabytes once copied: refused before the copy.
    (lambda p, k: p["state_dict"].update(bomb=torch.zeros(1).expand(100000, 100000)),
     "weight bomb stores fewer values than its shape (100000, 100000) needs"),
    # A small header asking for an enormous network (36 TB for 10^6 features).
    (lambda p, k: p["config"].update(base_features=10**6), "base_features must be a whole number within 1..64"),
    (lambda p, k: p["config"].update(n_stages="5"), "n_stages must be a whole number within 2..7, got '5'"),
    # Within each field's bounds, but attention on 256 px maps (4.5x the official network's time per
    # slice with 88 parameters), or 3.9x the official network's parameters: accepted before.
    (lambda p, k: p["config"].update(input_size=256, n_stages=2, n_attention_stages=2),
     "attention runs on 256 x 256 px maps (input_size 256, 2 of 2 stages), finer than the official network's 56 px"),
    (lambda p, k: p["config"].update(input_size=64, n_stages=7, base_features=64, max_features=512, n_conv_per_stage=4,
                                     n_attention_stages=6),
     "the network would have 126.8 M parameters, more than the official network's 32.5 M"),
    (lambda p, k: p["config"].update(name="small\nkind: official"), "name must be a short printable string"),
    (lambda p, k: p["inference"].update(threshold=float("nan")), "threshold must be a number within"),
    (lambda p, k: p["inference"].update(registration_iterations=10**9),
     "registration_iterations must be a whole number within [1, 1000]"),
    (lambda p, k: p["inference"].update(window_mm="20"), "window_mm must be a number within"),
    (lambda p, k: p.update(inference=[1, 2]), "its 'inference' entry is not a mapping"),
    # a misspelt parameter was dropped and the default used; a bool or negative version accepted
    (lambda p, k: p["inference"].update(treshold=0.9), "invalid header: unknown inference parameter(s): treshold"),
    (lambda p, k: p.update(format_version=True), "invalid header: format_version True"),
    (lambda p, k: p.update(format_version=-3), "invalid header: format_version -3"),
    (lambda p, k: p["preprocessing"].update(crop_scale=0.0), "crop_scale must be a number within [1, 10], got 0.0"),
    (lambda p, k: p["preprocessing"].update(input_size=64), "preprocessing input_size 64 differs from the network's 128"),
])
def test_own_format_untrusted_contents_are_refused(tmp_path, small_checkpoint, edit, phrase):
    payload = torch.load(small_checkpoint.path, weights_only=True)
    edit(payload, _first_weight(payload))
    payload.pop("sha256")  # the edit itself must be what is refused
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert phrase in str(err.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_as_float32(tmp_path, small_checkpoint, dtype):
    # bfloat16 crashed in the hash; each loads, hashed as stored, and runs in float32.
    payload = torch.load(small_checkpoint.path, weights_only=True)
    payload["state_dict"] = {k: v.to(dtype) for k, v in payload["state_dict"].items()}
    payload["sha256"] = weights_sha256(payload["state_dict"])
    path = tmp_path / f"{dtype}.pt"
    torch.save(payload, path)
    model = load_checkpoint_file(path)
    assert model.sha256 == payload["sha256"] != small_checkpoint.sha256
    assert all(p.dtype == torch.float32 for p in model.network.parameters())


def test_a_downloaded_error_page_says_so(tmp_path):
    page = tmp_path / "propmask.pth"
    page.write_text("<html><body>403 Forbidden</body></html>")
    with pytest.raises(CheckpointError, match="it is not a PyTorch file \\(it begins '<html><body>403 '\\); if "
                                              "you downloaded it, the download may have saved an error page"):
        load_checkpoint_file(page)


def test_describe_checkpoint(small_checkpoint):
    d = describe_checkpoint(small_checkpoint.path)
    assert d["kind"] == "pamsegment"
    assert d["network"]["name"] == "small"
    assert d["parameters"] == small_checkpoint.network.n_parameters()
    assert d["sha256"] == small_checkpoint.sha256
    assert d["provenance"]["seed"] == 1234
    assert d["loads"] is True


def test_default_weights_from_environment(monkeypatch, tmp_path, small_checkpoint):
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(small_checkpoint.path))
    assert load_model(None).sha256 == small_checkpoint.sha256
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(None)


def _install_with_card(folder: Path, weights: Path, card_sha256: str) -> Path:
    """``weights`` copied to folder/pam_small.pt, beside a model card pam_small.json recording
    ``card_sha256`` as its weights' sha256 (the fields scripts/make_model_card.py writes)."""
    path = folder / "pam_small.pt"
    shutil.copyfile(weights, path)
    (folder / "pam_small.json").write_text(json.dumps({"name": "pam_small", "file": "pam_small.pt",
                                                       "sha256_weights": card_sha256}))
    return path


def test_default_weights_must_match_their_model_card(monkeypatch, tmp_path, small_checkpoint):
    # Other weights under the default weights' name, beside the shipped card (which records
    # 795f18e3ce7cde76...): a damaged install or a replaced file. Nothing compared them before.
    shipped = json.loads((SHIPPED / "pam_small.json").read_text())["sha256_weights"]
    assert shipped.startswith("795f18e3ce7cde76") and small_checkpoint.sha256 != shipped
    path = _install_with_card(tmp_path, small_checkpoint.path, shipped)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(path))  # the default weights are now this file
    refusal = (f"checkpoint {path} does not match its model card pam_small.json: its weights' sha256 is "
               f"{small_checkpoint.sha256[:16]}..., the card's 795f18e3ce7cde76...; the install is damaged or the "
               "file was replaced: reinstall PAMSegment (if you changed the weights on purpose, write the card again "
               "with scripts/make_model_card.py)")
    for load in (lambda: load_model(None), lambda: load_model(path), lambda: describe_checkpoint(path)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(err.value).startswith(refusal)
    assert str(err.value) == refusal
    # The same file as an ordinary checkpoint (not the default weights) is not held to the card.
    monkeypatch.delenv("PAMSEGMENT_MODEL")
    assert load_model(path).sha256 == small_checkpoint.sha256
    # A card that records these weights, or none at all: the default weights load.
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(path))
    _install_with_card(tmp_path, small_checkpoint.path, small_checkpoint.sha256)
    assert load_model(None).sha256 == small_checkpoint.sha256
    (tmp_path / "pam_small.json").unlink()
    assert load_model(None).sha256 == small_checkpoint.sha256


def test_the_shipped_weights_need_their_card_whatever_the_environment_says(monkeypatch, tmp_path, small_checkpoint):
    """The shipped file's card was skipped when missing, unreadable or naming another file, and not
    looked at at all while PAMSEGMENT_MODEL named another file."""
    from PAMSegmentLib import checkpoints

    install = tmp_path / "install"
    install.mkdir()
    shipped = _install_with_card(install, small_checkpoint.path, small_checkpoint.sha256)
    monkeypatch.setattr(checkpoints, "shipped_checkpoint_path", lambda: shipped)
    other = _install_with_card(tmp_path, small_checkpoint.path, small_checkpoint.sha256)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(other))
    assert load_model(shipped).sha256 == small_checkpoint.sha256  # with its card: fine
    (install / "pam_small.json").write_text(json.dumps({"file": "pam_small.pt", "sha256_weights": "0" * 64}))
    with pytest.raises(CheckpointError, match="does not match its model card"):  # checked although the variable
        load_model(shipped)                                                        # names another file
    (install / "pam_small.json").write_text(json.dumps({"file": "other.pt", "sha256_weights": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"the model card pam_small.json beside the shipped weights .* is not "
                                              r"theirs"):
        load_model(shipped)
    (install / "pam_small.json").unlink()
    with pytest.raises(CheckpointError, match=r"the shipped weights .* have no readable model card pam_small.json "
                                              r"beside them \(FileNotFoundError\); the install is damaged"):
        load_model(shipped)
    monkeypatch.delenv("PAMSEGMENT_MODEL")
    with pytest.raises(CheckpointError, match="have no readable model card"):
        load_model(None)
    assert load_model(other).sha256 == small_checkpoint.sha256  # another file, with its own card


@pytest.mark.skipif(not (SHIPPED / "pam_small.pt").is_file(), reason="the shipped weights are not installed")
def test_one_byte_changed_in_the_shipped_header_is_refused(monkeypatch, tmp_path):
    """The card was compared on the weights' sha256 only: one byte of the header's pickle changed
    (the mask threshold 0.5 -> 0.75; torch does not check the zip's CRC) loaded and ran as the
    default weights, with 10 % of a result's voxels different."""
    import struct
    import zipfile

    path = tmp_path / "pam_small.pt"
    shutil.copyfile(SHIPPED / "pam_small.pt", path)
    shutil.copyfile(SHIPPED / "pam_small.json", tmp_path / "pam_small.json")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        pickled = z.read(name)
    at = data.find(pickled[:64]) + pickled.find(b"thresholdq") + len(b"thresholdq") + 2  # BINFLOAT: 8 bytes, big-endian
    assert struct.unpack(">d", bytes(data[at:at + 8]))[0] == 0.5
    data[at + 1] ^= 0x08
    assert struct.unpack(">d", bytes(data[at:at + 8]))[0] == 0.75
    path.write_bytes(bytes(data))
    # since session 47 the zip entry's CRC-32 is checked, which finds such a byte whatever the card
    with pytest.raises(CheckpointError, match=r"the file is damaged \(its entry '.*data\.pkl': Bad CRC-32"):
        load_model(path)
    # the same change written with a right checksum (the header re-saved): held to the card
    import torch

    obj = torch.load(SHIPPED / "pam_small.pt", weights_only=True)
    obj["inference"]["threshold"] = 0.75
    torch.save(obj, path)
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(path))
    with pytest.raises(CheckpointError, match=r"does not match its model card pam_small.json: its inference threshold "
                                              r"is 0.75, the card's 0.5; the install is damaged"):
        load_model(None)
    monkeypatch.delenv("PAMSEGMENT_MODEL")
    assert load_model(path).inference.threshold == 0.75  # as an ordinary checkpoint it is not held to the card


@pytest.mark.skipif(not (SHIPPED / "pam_small.pt").is_file(), reason="the shipped weights are not installed")
def test_shipped_weights_match_their_model_card(monkeypatch):
    monkeypatch.delenv("PAMSEGMENT_MODEL", raising=False)
    card = json.loads((SHIPPED / "pam_small.json").read_text())
    assert load_model(None).sha256 == card["sha256_weights"]


def test_cross_attention_equals_explicit_softmax_attention():
    """The fused kernel computes PAM's attention: softmax(Q K^T / sqrt(C)) V, then fc_out, per guide."""
    import math

    import torch

    from PAMSegmentLib.network import CrossAttention

    torch.manual_seed(0)
    attn = CrossAttention(16)
    q, k, v = torch.randn(2, 3, 16, 4, 5), torch.randn(2, 16, 4, 5), torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        out = attn(q, k, v)
        g, n, c, h, w = q.shape
        Q = attn.queries(q.permute(0, 1, 3, 4, 2).reshape(g, n * h * w, c))
        K = attn.keys(k.flatten(2).transpose(1, 2))
        V = attn.values(v.flatten(2).transpose(1, 2))
        ref = attn.fc_out(torch.softmax(Q @ K.transpose(1, 2) / math.sqrt(c), dim=-1) @ V)
        ref = ref.reshape(g, n, h, w, c).permute(0, 1, 4, 2, 3)
    assert out.shape == (2, 3, 16, 4, 5)
    assert torch.allclose(out, ref, atol=1e-5)


def test_instance_norm_equals_torch_instance_norm_with_the_same_parameters():
    """The network's norm (a per-channel GroupNorm, faster on CPU) is torch's InstanceNorm2d:
    same state-dict entries and the same output, per sample and per channel, in training
    (gradients) as in inference."""
    from torch import nn

    from PAMSegmentLib.network import InstanceNorm

    torch.manual_seed(0)
    ours, ref = InstanceNorm(6), nn.InstanceNorm2d(6, eps=1e-5, affine=True)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(6) + 0.5)
        ours.bias.copy_(torch.randn(6))
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}
    ref.load_state_dict(ours.state_dict())
    # channels with different scales and offsets, and one constant channel
    x = torch.randn(3, 6, 9, 7) * torch.arange(1, 7).view(1, 6, 1, 1) + 5 * torch.arange(3).view(3, 1, 1, 1)
    x[1, 2] = 4.0
    y1, y2 = ours(x), ref(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    # each sample's channel is normalised on its own: mean = bias, std = weight (constant: bias)
    assert torch.allclose(y1[2, 4].mean(), ours.bias[4], atol=1e-4)
    assert torch.allclose(y1[2, 4].std(unbiased=False), ours.weight[4], atol=1e-3)
    assert torch.allclose(y1[1, 2], ours.bias[2].expand(9, 7), atol=1e-4)
    # the same gradients for training (on a non-constant input: 1/sqrt(eps) is ill-conditioned)
    x[1, 2] = torch.randn(9, 7)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(x.shape)
    (ours(x1) * weights).sum().backward()
    (ref(x2) * weights).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    # and it is what the presets are built with
    net = PAMNetwork("small")
    norms = [m for m in net.modules() if isinstance(m, InstanceNorm)]
    assert len(norms) > 0 and not any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())


def test_small_prior_preset_feeds_the_guide_mask_to_the_image_encoder():
    """`small-prior`: the encoder's first conv takes (image, guide mask); changing only the guide
    mask changes the queries' full-resolution features, and decode_queries refuses no mask."""
    import torch

    from PAMSegmentLib.network import PRESETS, PAMNetwork

    torch.manual_seed(0)
    net = PAMNetwork(PRESETS["small-prior"]).eval()
    first = net.proposing_stage.encoder.stages[0][0].convs[0].conv
    assert first.in_channels == 2
    assert PAMNetwork(PRESETS["small"]).proposing_stage.encoder.stages[0][0].convs[0].conv.in_channels == 1
    g, q = torch.randn(1, 1, 128, 128), torch.randn(1, 2, 1, 128, 128)
    m1 = torch.zeros(1, 1, 128, 128)
    m1[..., 40:80, 40:80] = 1
    m2 = torch.zeros(1, 1, 128, 128)
    m2[..., 10:30, 90:120] = 1
    with torch.no_grad():
        a, b = net(g, m1, q).logits[0], net(g, m2, q).logits[0]
        keys, values = net.proposing_stage.encode_guide(g, m1)
        with pytest.raises(ValueError, match="guide mask"):
            net.proposing_stage.decode_queries(q, keys, values)
    assert not torch.allclose(a, b)


def test_set_inference_params_rewrites_the_header_not_the_weights(small_checkpoint, tmp_path):
    """scripts/set_inference_params.py: the chosen value is what the loaded model uses, the weights
    and their sha256 are unchanged, the change and its reason are kept in the provenance; a name
    that is not an inference parameter is one clear error (exit 1, nothing written)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "set_inference_params.py"
    out = tmp_path / "fused.pt"
    done = subprocess.run([sys.executable, str(script), str(small_checkpoint.path), "--set", "registration_weight=0.6",
                           "--reason", "validation 0.7 vs 0.6", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before, after = load_checkpoint_file(small_checkpoint.path), load_checkpoint_file(out)
    assert before.inference.registration_weight == 0.0 and after.inference.registration_weight == 0.6
    assert after.sha256 == before.sha256 == small_checkpoint.sha256
    for (k, v), (k2, v2) in zip(before.network.state_dict().items(), after.network.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert after.provenance["inference_changes"] == [
        {"set": {"registration_weight": 0.6}, "before": {"registration_weight": 0.0}, "reason": "validation 0.7 vs 0.6"}]
    bad = subprocess.run([sys.executable, str(script), str(small_checkpoint.path), "--set", "windw_mm=10",
                          "--reason", "x", "--out", str(tmp_path / "bad.pt")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "--set expects NAME=VALUE with NAME one of window_mm" in bad.stderr
    assert not (tmp_path / "bad.pt").exists()
    # An existing --out other than the checkpoint needs --overwrite; a card beside --out that describes
    # other weights is refused (it wrote the weights and left a card the pair no longer loads with).
    again = [sys.executable, str(script), str(small_checkpoint.path), "--set", "registration_weight=0.5", "--reason",
             "x", "--out", str(out)]
    kept = out.read_bytes()
    refused = subprocess.run(again, capture_output=True, text=True)
    assert refused.returncode == 1 and "exists and is another file than the checkpoint; give --overwrite" in \
        refused.stderr and out.read_bytes() == kept
    out.with_suffix(".json").write_text(json.dumps({"file": out.name, "sha256_weights": "0" * 64, "inference": {}}))
    refused = subprocess.run(again + ["--overwrite"], capture_output=True, text=True)
    assert refused.returncode == 1 and "is the model card of other weights (000000000000..." in refused.stderr
    assert out.read_bytes() == kept
    # A card of these weights follows: inference, its provenance's changes and the file size
    out.with_suffix(".json").write_text(json.dumps({"file": out.name, "sha256_weights": small_checkpoint.sha256,
                                                    "inference": {}, "provenance": {}, "size_bytes": 1}))
    done = subprocess.run(again + ["--overwrite"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["inference"]["registration_weight"] == 0.5 and card["size_bytes"] == out.stat().st_size
    assert card["provenance"]["inference_changes"] == load_checkpoint_file(out).provenance["inference_changes"] == [
        {"set": {"registration_weight": 0.5}, "before": {"registration_weight": 0.0}, "reason": "x"}]


def test_a_header_sha256_that_is_not_text_and_provenance_with_odd_keys(tmp_path, small_checkpoint, run_cli):
    """A 'sha256' entry that is a tensor raised "Boolean value of Tensor ... is ambiguous" (a
    traceback in info and propagate); a provenance with a tuple key made `info` fail in json."""
    ck = torch.load(small_checkpoint.path, weights_only=True)
    bad = dict(ck, sha256=torch.zeros(2))
    torch.save(bad, tmp_path / "sha_tensor.pt")
    with pytest.raises(CheckpointError, match=r"has an invalid header: its 'sha256' entry is not text$"):
        load_model(tmp_path / "sha_tensor.pt")
    odd = dict(ck, provenance={(1, 2): "x", "nested": {3: torch.ones(1)}})
    torch.save(odd, tmp_path / "prov.pt")
    assert load_model(tmp_path / "prov.pt").provenance == {"(1, 2)": "x", "nested": {"3": "tensor([1.])"}}
    for args in (["info", tmp_path / "prov.pt"], ["info", "--json", tmp_path / "prov.pt"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and '"(1, 2)": "x"' in proc.stdout, proc.stderr
    proc = run_cli("info", tmp_path / "sha_tensor.pt")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("its 'sha256' entry is not text")


def test_weights_that_overflow_are_named_not_reported_as_a_stop(tmp_path, small_checkpoint):
    """Finite but absurd weights (1e30) passed every load check; the network's output was NaN, so
    the run "succeeded" with the drawn slice alone and a note blaming the drift test."""
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.propagate import propagate

    ck = torch.load(small_checkpoint.path, weights_only=True)
    sd = dict(ck["state_dict"])
    first = sorted(sd)[0]
    sd[first] = torch.full_like(sd[first], 1e30)
    bad = dict(ck, state_dict=sd)
    bad.pop("sha256", None)
    torch.save(bad, tmp_path / "huge.pt")
    model = load_model(tmp_path / "huge.pt")  # loads: every value is finite
    rng = np.random.default_rng(0)
    image = rng.normal(0, 10, (12, 48, 48)).astype(np.float32)
    image[:, 14:34, 14:34] += 200
    prompt = np.zeros(image.shape, np.uint8)
    prompt[6, 14:34, 14:34] = 1
    with pytest.raises(PAMError, match=r"^the network's output is not finite \(NaN or inf\) on slice \d+: the "
                                       r"checkpoint .*huge.pt holds weights that overflow; use another checkpoint$"):
        propagate(image, prompt, (2.0, 1.0, 1.0), model, threads=1)


def test_a_checkpoint_path_that_is_a_broken_link_is_named_as_such(tmp_path):
    from PAMSegmentLib.checkpoints import check_checkpoint_file

    (tmp_path / "a.pt").symlink_to(tmp_path / "b.pt")
    (tmp_path / "b.pt").symlink_to(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a.pt is a symbolic link to nothing \(or one of a loop of links\); "
                                              r"point it at the checkpoint file$"):
        check_checkpoint_file(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt does not exist; check the path$"):
        check_checkpoint_file(tmp_path / "missing.pt")


def test_a_checkpoint_loaded_off_the_main_thread_leaves_the_warning_filters_alone(small_checkpoint, monkeypatch):
    """A Slicer review: the worker thread loaded the model inside warnings.catch_warnings, which
    swaps the process-wide filters (not thread-safe: a filter the GUI thread set meanwhile could be
    lost). Off the main thread the load does not touch them."""
    import threading
    import warnings

    from PAMSegmentLib.checkpoints import load_checkpoint_file

    real, on_main = warnings.catch_warnings, []

    def spy(*args, **kwargs):
        on_main.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(warnings, "catch_warnings", spy)
    got = []
    worker = threading.Thread(target=lambda: got.append(load_checkpoint_file(small_checkpoint.path)))
    worker.start()
    worker.join(60)
    monkeypatch.undo()
    assert len(got) == 1 and got[0].network is not None
    assert False not in on_main  # no catch_warnings entered on the worker
