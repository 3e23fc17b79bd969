"""Versioned predictor artifacts: a folder with a manifest, the router and the length forest.

Loading checks everything a stale or foreign folder could get wrong and says which file and why.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib

import chimera

FORMAT = "chimera-predictors"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ROUTER_FILE = "router.joblib"
LENGTH_FILE = "length.joblib"


class ArtifactError(ValueError):
    """A predictor folder that cannot be used; the message names the folder, the file and the reason."""


def ids_digest(ids: list[str]) -> str:
    """Order-free fingerprint of the training task ids (so a simulation can prove it never tests on them)."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Predictors:
    """A trained router and length forest with what they were trained on."""

    router: Any
    length: Any
    models: list[str]
    train_frac: float
    train_ids: list[str]
    workloads: list[str]
    metrics: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    digest: str = ""  # of the manifest it was loaded from (which lists every file's checksum): names this content

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.router, out / ROUTER_FILE)
        joblib.dump(self.length, out / LENGTH_FILE)
        (out / "train_ids.json").write_text(json.dumps(sorted(self.train_ids)))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "chimera_version": chimera.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": self.models,
            "workloads": self.workloads,
            "train_frac": self.train_frac,
            "split": "zlib.crc32(task id) % 10000 < train_frac * 10000 -> train",
            "train_tasks": len(self.train_ids),
            "train_ids_digest": ids_digest(self.train_ids),
            "feature_spec": self.spec,
            "metrics": self.metrics,
            "files": {ROUTER_FILE: _sha(out / ROUTER_FILE), LENGTH_FILE: _sha(out / LENGTH_FILE)},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _manifest_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:12]


def manifest_digest(folder: str | Path) -> str | None:
    """The digest `load_predictors` gives the folder's content (its manifest lists every file's checksum); None if
    the folder has no readable manifest."""
    try:
        return _manifest_digest((Path(folder) / MANIFEST).read_bytes())
    except OSError:
        return None


def load_predictors(folder: str | Path) -> Predictors:
    """Load and verify a predictor folder written by `Predictors.save` (`chimera train --out`)."""
    d = Path(folder)
    if not d.is_dir():
        raise ArtifactError(f"{d}: predictor folder not found (train one with `chimera train --out {d}`)")
    mpath = d / MANIFEST
    if not mpath.exists():
        raise ArtifactError(f"{mpath}: missing manifest; not a folder written by `chimera train`")
    try:
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a Chimera predictor manifest (format={manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{mpath}: not a Chimera predictor manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')} is incompatible with this "
                            f"Chimera (expects {FORMAT_VERSION}); retrain with `chimera train`")
    for key in ("models", "train_frac", "files", "train_ids_digest"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks '{key}'")
    objs = {}
    for fname, digest in manifest["files"].items():
        f = d / fname
        if not f.exists():
            raise ArtifactError(f"{f}: missing (listed in {MANIFEST})")
        if _sha(f) != digest:
            raise ArtifactError(f"{f}: checksum mismatch with {MANIFEST} (file changed or truncated); retrain")
        try:
            objs[fname] = joblib.load(f)
        except Exception as e:  # joblib raises many types for a bad pickle
            raise ArtifactError(f"{f}: cannot be loaded ({type(e).__name__}: {e})") from None
    ids_path = d / "train_ids.json"
    try:
        train_ids = json.loads(ids_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{ids_path}: missing or corrupt ({e})") from None
    if ids_digest(train_ids) != manifest["train_ids_digest"]:
        raise ArtifactError(f"{ids_path}: does not match the manifest's train_ids_digest; retrain")
    return Predictors(
        router=objs[ROUTER_FILE], length=objs[LENGTH_FILE], models=list(manifest["models"]),
        train_frac=float(manifest["train_frac"]), train_ids=train_ids, workloads=list(manifest.get("workloads", [])),
        metrics=manifest.get("metrics", {}), spec=manifest.get("feature_spec", {}),
        digest=_manifest_digest(raw),
    )
