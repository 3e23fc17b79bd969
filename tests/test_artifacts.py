"""Predictor folders: round trip, and every way a folder can be bad gives an error naming the file and reason."""

from __future__ import annotations

import json

import pytest

from chimera.predict.artifacts import MANIFEST, ArtifactError, Predictors, load_predictors


def _bundle() -> Predictors:
    return Predictors(router={"kind": "router", "w": [1, 2, 3]}, length={"kind": "forest"}, models=["a", "b"],
                      train_frac=0.7, train_ids=["t2", "t1"], workloads=["synthetic"], metrics={"auc": 0.8})


def test_round_trip(tmp_path):
    _bundle().save(tmp_path / "p")
    got = load_predictors(tmp_path / "p")
    assert got.router == {"kind": "router", "w": [1, 2, 3]} and got.length == {"kind": "forest"}
    assert got.models == ["a", "b"] and got.train_frac == 0.7 and sorted(got.train_ids) == ["t1", "t2"]
    assert got.metrics == {"auc": 0.8}


def test_missing_folder(tmp_path):
    with pytest.raises(ArtifactError, match="predictor folder not found"):
        load_predictors(tmp_path / "nope")


def test_missing_manifest(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(ArtifactError, match="missing manifest"):
        load_predictors(tmp_path / "p")


def test_corrupt_manifest(tmp_path):
    _bundle().save(tmp_path / "p")
    (tmp_path / "p" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        load_predictors(tmp_path / "p")


def test_incompatible_version(tmp_path):
    _bundle().save(tmp_path / "p")
    m = json.loads((tmp_path / "p" / MANIFEST).read_text())
    m["format_version"] = 99
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 99 is incompatible"):
        load_predictors(tmp_path / "p")


def test_truncated_model_file(tmp_path):
    _bundle().save(tmp_path / "p")
    f = tmp_path / "p" / "router.joblib"
    f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ArtifactError, match="router.joblib: checksum mismatch"):
        load_predictors(tmp_path / "p")


def test_unloadable_model_file_with_matching_checksum(tmp_path):
    _bundle().save(tmp_path / "p")
    f = tmp_path / "p" / "length.joblib"
    f.write_bytes(b"garbage that is not a pickle")
    m = json.loads((tmp_path / "p" / MANIFEST).read_text())
    import hashlib

    m["files"]["length.joblib"] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="length.joblib: cannot be loaded"):
        load_predictors(tmp_path / "p")


def test_missing_model_file(tmp_path):
    _bundle().save(tmp_path / "p")
    (tmp_path / "p" / "length.joblib").unlink()
    with pytest.raises(ArtifactError, match="length.joblib: missing"):
        load_predictors(tmp_path / "p")


def test_foreign_manifest(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a Chimera predictor manifest"):
        load_predictors(tmp_path / "p")
