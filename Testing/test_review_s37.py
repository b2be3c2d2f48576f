"""Session 37: what hostile-input trials (fuzzed checkpoints, files, HTTP requests, engine properties) found."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ellipsoid
from doubles import OracleModel

from PAMSegmentLib.errors import InputError
from PAMSegmentLib.propagate import propagate

SHAPE = (16, 24, 24)


def _case():
    truth = ellipsoid(SHAPE, (8, 12, 12), (5, 6, 6))
    prompt = np.zeros(SHAPE, np.uint8)
    prompt[8][truth[8]] = 1
    return truth.astype(np.float32) * 100, prompt, truth


@pytest.mark.parametrize("options, says", [
    # a dict of two keys passed the length test, then range[0] was KeyError: 0 (a 500 from the server)
    ({"range": {"a": 1, "b": 2}}, "range must be (first, last) slice numbers, got {'a': 1, 'b': 2}"),
    ({"range": {1, 2}}, "range must be (first, last) slice numbers, got {1, 2}"),
    # a dict's keys were taken as the labels: "a label must be a whole number, got '1'"
    ({"labels": {"1": 2}}, "labels must be a list of label numbers, got {'1': 2}"),
    # a client's 309-digit number filled the message and the server's log
    ({"empty_slices": [10 ** 308]}, "empty slice 1" + "0" * 56 + "... lies outside the range 0:15"),
    ({"labels": [0.5] * 40}, "a label must be a whole number, got 0.5"),
])
def test_option_values_of_the_wrong_kind_are_one_short_message(options, says):
    image, prompt, truth = _case()
    with pytest.raises(InputError) as err:
        propagate(image, prompt, (2.0, 1.0, 1.0), OracleModel(truth), **options)
    assert says in str(err.value)
    assert len(str(err.value)) < 200


def test_shown_cuts_long_values_and_names_huge_numbers():
    from PAMSegmentLib.checks import shown

    assert shown([1, 2]) == "[1, 2]"
    assert shown("x" * 100) == "'" + "x" * 56 + "..."
    assert len(shown(list(range(1000)))) == 60
    assert shown(10 ** 5000) == "a number of about 5000 digits"  # repr refuses ints over 4300 digits


def _server_client(token=None):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from PAMSegmentLib.server import create_app

    image, prompt, truth = _case()
    return TestClient(create_app(lambda method: OracleModel(truth), token=token)), image, prompt


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_the_server_refuses_a_range_dict_and_a_true_false_spacing_with_a_400():
    client, image, prompt = _server_client()
    body = _npz(image=image, prompt=prompt, spacing=np.array([2.0, 1.0, 1.0]))
    r = client.post("/jobs", params={"options": json.dumps({"range": {"a": 1, "b": 2}})}, content=body)
    assert r.status_code == 400 and "range must be (first, last) slice numbers" in r.json()["detail"]
    # [True, True, True] was read as 1 mm (the engine refuses True as a spacing from Python)
    r = client.post("/jobs", content=_npz(image=image, prompt=prompt, spacing=np.ones(3, bool)))
    assert r.status_code == 400 and "got true/false values" in r.json()["detail"]


def test_the_server_has_no_docs_pages_and_no_slash_redirects():
    client, _, _ = _server_client(token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    for path in ("/docs", "/redoc", "/jobs/"):  # Swagger/ReDoc load scripts from a CDN; /jobs/ was a 307
        r = client.get(path, headers=auth, follow_redirects=False)
        assert r.status_code == 404, (path, r.status_code)
    r = client.get("/openapi.json", headers=auth)
    assert r.status_code == 200 and "/jobs/{job_id}/result" in r.json()["paths"]
    assert client.get("/openapi.json").status_code == 401  # behind the token like the rest
