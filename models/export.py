"""Versioned serving bundle: weights (safetensors), config, catalog item embeddings, manifest.

Why a bundle and not a checkpoint: serving and batch inference must load exactly the trained
function without Lightning, without pickle (a checkpoint is a pickle: loading one executes
code) and with a way to prove the files belong together. The manifest holds the sha256 of
every file and the shapes; ``load_bundle`` refuses a bundle whose files were truncated,
swapped or edited, with a ``BundleError`` naming the problem.

Finiteness: a diverged run (NaN/inf weights) must never become servable. ``export_bundle``
refuses a model with a non-finite parameter or buffer, and ``load_bundle`` refuses non-finite
weights or item embeddings even when the manifest is consistent (a buggy exporter signs what it
writes), naming the tensor. A NaN weight would otherwise load silently and turn every score of
every request into NaN.

model_version = ``<run name or UTC timestamp>-<first 8 hex of the weights' sha256>``, so two
different weight sets never share a version string, and the cached user states (which carry
the version) can be checked against the head that reads them.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.data import build_catalog
from models.manifest import HASHED_FILES, BundleError, sha256_file, verified_manifest
from models.two_tower import ContextualTwoTower, ModelConfig
import ctt_contracts as C
from ctt_contracts.files import replacing_dir

FORMAT_VERSION = 1
BUNDLE_ARTIFACT_PATH = "bundle"  # folder name of the bundle among a run's MLflow artifacts


@dataclass
class Bundle:
    model: ContextualTwoTower  # eval mode
    config: ModelConfig
    manifest: Dict[str, Any]
    item_ids: np.ndarray  # (N,) int64
    item_embeddings: np.ndarray  # (N, D) float32, row i <-> item_ids[i]
    model_version: str
    path: Path
    # categories per context the model was trained with (ctt_contracts.project_context's k):
    # the resolver projects a subject item with it
    context_top_k: int = C.DEFAULT_CONTEXT_TOP_K


def non_finite_tensors(tensors: Dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (sorted)."""
    return sorted(name for name, t in tensors.items()
                  if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def _describe_non_finite(tensors: Dict[str, torch.Tensor], names: list[str]) -> str:
    """``name (3 NaN, 1 inf of 64)`` for the first few offending tensors."""
    parts = [f"{n} ({int(tensors[n].isnan().sum())} NaN, {int(tensors[n].isinf().sum())} inf "
             f"of {tensors[n].numel()})" for n in names[:5]]
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(parts) + more


def make_model_version(prefix: Optional[str], weights_sha256: str) -> str:
    """``<prefix or UTC timestamp>-<sha8>``; a prefix already ending in this sha8 is kept as is."""
    sha8 = weights_sha256[:8]
    prefix = prefix or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if prefix.endswith(f"-{sha8}"):
        return prefix
    return f"{prefix}-{sha8}"


@torch.no_grad()
def catalog_embeddings(model: ContextualTwoTower, catalog: pd.DataFrame, id_gate: Optional[np.ndarray] = None,
                       batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Item-tower embeddings of every catalog item: ids (N,) int64, embeddings (N, D) float32.

    ``id_gate`` (N,) in item-id order: the trainer's per-item id-embedding weight (see
    models/system.py ``id_gate``); None = every id at full weight."""
    cat = build_catalog(catalog, model.config.max_item_categories)
    gate = torch.ones(len(cat)) if id_gate is None else torch.as_tensor(id_gate, dtype=torch.float32)
    if gate.shape != (len(cat),):
        raise ValueError(f"id_gate must be ({len(cat)},), got {tuple(gate.shape)}")
    was_training = model.training
    model.eval()
    out = [model.item_embeddings(cat.item_ids[i:i + batch_size], cat.cat_ids[i:i + batch_size],
                                 cat.cat_weights[i:i + batch_size], gate[i:i + batch_size])
           for i in range(0, len(cat), batch_size)]
    model.train(was_training)
    return cat.item_ids.numpy().astype(np.int64), torch.cat(out).numpy().astype(np.float32)


def export_bundle(model: ContextualTwoTower, config: ModelConfig, catalog: pd.DataFrame,
                  out_dir: Path | str, model_version: Optional[str],
                  extra_manifest: Optional[Dict[str, Any]] = None,
                  id_gate: Optional[np.ndarray] = None,
                  context_top_k: int = C.DEFAULT_CONTEXT_TOP_K) -> Path:
    """Write the bundle into ``out_dir`` (replaced atomically if it exists) and return it.

    ``model_version`` is the run name / timestamp prefix (None = now); the stored version gets the
    weights' sha8 appended (see module docstring). ``catalog`` is the items table (item_id,
    category_ids, category_weights). ``extra_manifest`` is merged into the manifest (e.g.
    ``input_versions``: Delta versions of the training inputs). ``context_top_k`` = the k the
    training contexts were projected with (the lake's build configuration), recorded in the
    manifest for the resolver.
    """
    if config != model.config:
        raise ValueError("config differs from the model's own config; export the config it was built with")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = non_finite_tensors(state)
    if bad:
        raise BundleError(f"refusing to export a model with non-finite weights (a diverged run): "
                          f"{_describe_non_finite(state, bad)}")
    out_dir = Path(out_dir)
    with replacing_dir(out_dir) as tmp:
        save_file(state, str(tmp / C.BUNDLE_WEIGHTS))
        weights_sha = sha256_file(tmp / C.BUNDLE_WEIGHTS)
        version = make_model_version(model_version, weights_sha)
        (tmp / C.BUNDLE_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        item_ids, item_emb = catalog_embeddings(model, catalog, id_gate)
        if not np.isfinite(item_emb).all():  # finite weights can still overflow in the item tower
            raise BundleError(f"refusing to export non-finite {C.BUNDLE_ITEM_EMBEDDINGS}: "
                              f"{int((~np.isfinite(item_emb)).any(axis=1).sum())} of {len(item_emb)} rows")
        np.save(tmp / C.BUNDLE_ITEM_IDS, item_ids)
        np.save(tmp / C.BUNDLE_ITEM_EMBEDDINGS, item_emb)
        manifest: Dict[str, Any] = dict(extra_manifest or {})
        manifest.update({
            "format_version": FORMAT_VERSION,
            C.MODEL_VERSION: version,
            C.BUNDLE_CREATED_AT: dt.datetime.now(dt.timezone.utc).isoformat(),
            "dim": config.dim,
            "state_dim": config.state_dim,
            "n_items": int(item_ids.shape[0]),
            C.CONTEXT_TOP_K: _check_top_k(context_top_k, "context_top_k"),
            "files": {name: sha256_file(tmp / name) for name in HASHED_FILES},
        })
        manifest.setdefault("input_versions", {})
        (tmp / C.BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def _check_top_k(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BundleError(f"{where}: {C.CONTEXT_TOP_K} must be an integer >= 1, got {value!r}")
    return value


def load_bundle(path: Path | str) -> Bundle:
    """Load and verify a bundle: checksums, config, weights (safetensors only) and shapes.

    A manifest without ``context_top_k`` (a bundle exported before it was recorded) loads with
    the old fixed default, ``ctt_contracts.DEFAULT_CONTEXT_TOP_K`` (3), which every lake was
    built with until the value became a stored build flag.
    """
    path = Path(path)
    manifest = verified_manifest(path)
    version = manifest[C.MODEL_VERSION]
    try:
        config = ModelConfig.from_dict(json.loads((path / C.BUNDLE_CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise BundleError(f"{path / C.BUNDLE_CONFIG}: invalid model config ({err})") from err
    if (config.dim, config.state_dim) != (manifest["dim"], manifest["state_dim"]):
        raise BundleError(f"{path}: config dims ({config.dim}, {config.state_dim}) differ from the "
                          f"manifest ({manifest['dim']}, {manifest['state_dim']})")
    try:
        state = load_file(str(path / C.BUNDLE_WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{path / C.BUNDLE_WEIGHTS}: unreadable safetensors file ({err})") from err
    model = ContextualTwoTower(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{path / C.BUNDLE_WEIGHTS}: tensors do not match the config "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise BundleError(f"{path / C.BUNDLE_WEIGHTS}: tensor shapes do not match the config: {wrong[:3]}")
    bad = non_finite_tensors(state)
    if bad:
        raise BundleError(f"{path / C.BUNDLE_WEIGHTS}: non-finite weights (NaN/inf, a diverged run): "
                          f"{_describe_non_finite(state, bad)}")
    model.load_state_dict(state, strict=True)
    model.eval()
    item_ids = np.load(path / C.BUNDLE_ITEM_IDS, allow_pickle=False)
    item_emb = np.load(path / C.BUNDLE_ITEM_EMBEDDINGS, allow_pickle=False)
    n = manifest["n_items"]
    if item_ids.shape != (n,) or item_ids.dtype != np.int64:
        raise BundleError(f"{path / C.BUNDLE_ITEM_IDS}: expected int64 ({n},), got {item_ids.dtype} {item_ids.shape}")
    if item_emb.shape != (n, config.dim) or item_emb.dtype != np.float32:
        raise BundleError(f"{path / C.BUNDLE_ITEM_EMBEDDINGS}: expected float32 ({n}, {config.dim}), "
                          f"got {item_emb.dtype} {item_emb.shape}")
    finite_rows = np.isfinite(item_emb).all(axis=1)  # (N,)
    if not finite_rows.all():
        rows = np.flatnonzero(~finite_rows)
        raise BundleError(f"{path / C.BUNDLE_ITEM_EMBEDDINGS}: non-finite (NaN/inf) embeddings in "
                          f"{len(rows)} rows, e.g. item_ids {item_ids[rows[:5]].tolist()}")
    top_k = _check_top_k(manifest.get(C.CONTEXT_TOP_K, C.DEFAULT_CONTEXT_TOP_K),
                         str(path / C.BUNDLE_MANIFEST))
    return Bundle(model=model, config=config, manifest=manifest, item_ids=item_ids,
                  item_embeddings=item_emb, model_version=version, path=path,
                  context_top_k=top_k)


def load_bundle_from_mlflow(run_id: Optional[str] = None, model_name: Optional[str] = None,
                            version: Optional[str | int] = None,
                            tracking_uri: Optional[str] = None) -> Bundle:
    """Download a bundle logged by a training run (``run_id``) or registered as a model version
    (``model_name`` + ``version``, newest version if None) and load it with :func:`load_bundle`."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from models.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(None, tracking_uri)
    if (run_id is None) == (model_name is None):
        raise ValueError("pass exactly one of run_id or model_name")
    if model_name is not None:
        client = MlflowClient(uri)
        if version is None:
            versions = client.search_model_versions(f"name='{model_name}'")
            if not versions:
                raise BundleError(f"registered model {model_name!r} has no versions at {uri}")
            version = max(int(v.version) for v in versions)
        source = client.get_model_version(model_name, str(version)).source
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)
    else:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BUNDLE_ARTIFACT_PATH,
                                                    tracking_uri=uri)
    return load_bundle(local)
