"""Batch-inference worker code without Spark: batching parity, model cache, closure contents."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from offline_lake import histories, reference_states

import ctt_contracts as C
from pipelines import inference_worker as worker


def test_encode_histories_matches_one_user_at_a_time(bundles):
    from models.export import load_bundle

    hist = histories(40)
    model = load_bundle(bundles.first).model
    expected = reference_states(bundles.first, hist)
    got = worker.encode_histories(model, list(hist.values()), batch_size=7)  # ragged last batch
    assert got.dtype == np.float32 and got.shape == (40, model.state_dim)
    np.testing.assert_allclose(got, np.stack([expected[u] for u in hist]), atol=1e-5, rtol=0)


def test_length_order_groups_alike_lengths_stably():
    hist = [([1, 2, 3], [1, 2, 3]), ([4], [1]), ([5, 6], [1, 2]), ([7], [2]), ([], [])]
    assert worker.length_order(hist).tolist() == [4, 1, 3, 2, 0]


def test_encode_batch_reads_sliced_arrow_lists(bundles):
    """Arrow batches handed to mapInArrow can be slices: offsets are relative to the backing
    values, which _list_rows must honour (else users get each other's histories)."""
    hist = histories(10)
    users = sorted(hist)
    table = pa.table({C.USER_ID: pa.array(users, pa.int64()),
                      C.ITEM_IDS: pa.array([hist[u][0] for u in users], pa.list_(pa.int64())),
                      C.EVENT_TS: pa.array([hist[u][1] for u in users], pa.list_(pa.int64())),
                      C.SEQUENCE_HASH: pa.array([f"h{u}" for u in users])})
    batch = table.to_batches()[0].slice(3, 5)
    model = worker.cached_model(str(bundles.first), _version(bundles.first))
    out = worker.encode_batch(batch, model, batch_size=2)
    expected = reference_states(bundles.first, {u: hist[u] for u in users[3:8]})
    assert out.column(C.USER_ID).to_pylist() == users[3:8]
    assert out.column(C.SEQUENCE_HASH).to_pylist() == [f"h{u}" for u in users[3:8]]
    got = np.array(out.column(C.HIDDEN_STATE).to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([expected[u] for u in users[3:8]]), atol=1e-5, rtol=0)


def test_model_is_cached_per_process_and_version_checked(bundles):
    version = _version(bundles.first)
    a = worker.cached_model(str(bundles.first), version)
    assert worker.cached_model(str(bundles.first), version) is a
    from models.export import BundleError

    with pytest.raises(BundleError, match="replaced during the run"):
        worker.cached_model(str(bundles.first), "some-other-version-00000000")


def test_mapinarrow_closure_carries_a_path_not_the_model(bundles):
    import torch
    from pyspark import cloudpickle  # the pickler Spark uses for mapInArrow functions

    fn = worker.make_encoder(str(bundles.first), _version(bundles.first), 1024)
    blob = cloudpickle.dumps(fn)
    assert len(blob) < 20_000  # the weights alone are far larger
    cells = [c.cell_contents for c in fn.__closure__]
    assert not any(isinstance(c, torch.nn.Module) for c in cells)
    assert str(bundles.first) in cells
    assert pickle.loads(blob) is not None


def test_non_positive_batch_size_is_rejected(bundles):
    model = worker.cached_model(str(bundles.first), _version(bundles.first))
    with pytest.raises(ValueError, match="batch_size"):
        worker.encode_histories(model, [([1], [1])], batch_size=0)


def test_the_worker_module_imports_no_pyspark():
    """Executors import the worker for every mapInArrow task: it must not need a Spark driver
    (nor pull one in) to load, and the model loader comes only with the first batch."""
    code = ("import sys, pipelines.inference_worker; "
            "print(sorted(m for m in ('pyspark', 'torch', 'pipelines.inference') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _version(bundle_dir) -> str:
    import json

    return json.loads((bundle_dir / C.BUNDLE_MANIFEST).read_text())[C.MODEL_VERSION]
