"""ContextualSequenceDataModule on a tiny Delta lake written with deltalake (no Spark)."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from models import features
from models.data import (HAS_REAL_CONTEXT, INPUT_TABLES, LABEL_ROW, NO_SUBJECT, REAL_CONTEXT_IDS,
                         REAL_CONTEXT_WEIGHTS, SUBJECT_ITEM_ID, SUBJECT_ROW,
                         ContextualSequenceDataModule, ShardedBatches, equal_length_cuts,
                         length_bucketed, train_batch_size)
import ctt_contracts as C


def _dm(lake, **kw):
    dm = ContextualSequenceDataModule(str(lake), batch_size=64, max_len=8, max_ctx=3,
                                      max_item_categories=4, country_buckets=8, **kw)
    dm.setup("fit")
    return dm


def test_setup_builds_aligned_tensors_and_records_versions(tiny_lake):
    dm = _dm(tiny_lake)
    seqs = DeltaTable(C.LakePaths(str(tiny_lake)).table(C.T_SEQUENCES)).to_pandas()
    assert dm.input_versions == {t: 0 for t in INPUT_TABLES}
    for split in C.SPLITS:
        t = dm.splits[split]
        n = int((seqs[C.SPLIT] == split).sum())
        assert t[C.ITEM_IDS].shape == (n, 8) and t[C.CONTEXT_CATEGORY_IDS].shape == (n, 3)
        # every split, train included, carries the real context and its subject item
        assert t[REAL_CONTEXT_IDS].shape == (n, 3) and t[HAS_REAL_CONTEXT].shape == (n,)
        assert t[SUBJECT_ITEM_ID].dtype == torch.int64 and t[SUBJECT_ROW].dtype == torch.int64
        # the label row points at the label item in the catalog
        assert torch.equal(dm.catalog.item_ids[t[LABEL_ROW]], t[C.LABEL_ITEM_ID])
    # pseudo context = the label item's top categories (as written by the pipeline / fixture)
    train = dm.splits[C.SPLIT_TRAIN]
    row = 5
    label_row = int(train[LABEL_ROW][row])
    item_cats = dm.catalog.cat_ids[label_row]
    ctx = train[C.CONTEXT_CATEGORY_IDS][row]
    assert ctx[0] == item_cats[0]  # highest-confidence category first
    assert set(ctx[ctx >= 0].tolist()) <= set(item_cats[item_cats >= 0].tolist())
    assert torch.allclose(train[C.CONTEXT_WEIGHTS].sum(1), torch.ones(len(train[LABEL_ROW])))
    # histories are left-padded, newest last, and strictly older than the label
    hist = train[C.ITEM_IDS][0]
    assert hist[-1] != features.PAD_ITEM
    freq = dm.item_frequencies()
    assert freq.shape == (len(dm.catalog),) and (freq > 0).all()
    assert freq.sum().item() == pytest.approx(1.0, abs=1e-5)
    test = dm.splits[C.SPLIT_TEST]
    assert test[HAS_REAL_CONTEXT].all() and (test[REAL_CONTEXT_IDS][:, 0] >= 0).all()
    # the subject is the real row's subject item; its top category leads the real context
    ctx = DeltaTable(C.LakePaths(str(tiny_lake)).table(C.T_CONTEXT_ROWS)).to_pandas()
    real = ctx[ctx[C.CONTEXT_SOURCE] == C.CONTEXT_REAL]
    aligned = seqs[seqs[C.SPLIT] == C.SPLIT_TRAIN].merge(real, on=C.SEQUENCES_KEY, how="left")
    assert np.array_equal(train[SUBJECT_ITEM_ID].numpy(), aligned[C.SUBJECT_ITEM_ID].to_numpy(np.int64))
    assert torch.equal(dm.catalog.item_ids[train[SUBJECT_ROW]], train[SUBJECT_ITEM_ID])
    top = dm.catalog.cat_ids[train[SUBJECT_ROW], 0]
    assert torch.equal(train[REAL_CONTEXT_IDS][:, 0], top)


def test_train_loader_yields_whole_batches(tiny_lake):
    dm = _dm(tiny_lake)
    batches = list(dm.train_dataloader())
    n_train = len(dm.splits[C.SPLIT_TRAIN][LABEL_ROW])
    assert len(batches) == n_train // 64
    assert all(b[C.ITEM_IDS].shape == (64, 8) for b in batches)
    seen = torch.cat([b[C.USER_ID] for b in dm.val_dataloader()])
    assert torch.equal(seen, dm.splits[C.SPLIT_VAL][C.USER_ID])  # validation is not shuffled


def test_a_training_split_smaller_than_a_batch_is_one_batch(tiny_lake):
    """A small real log (a few hundred conversions) must still train: with whole batches only,
    a split smaller than ``batch_size`` would give no step at all."""
    dm = ContextualSequenceDataModule(str(tiny_lake), batch_size=100_000, max_len=8, max_ctx=3,
                                      max_item_categories=4, country_buckets=8)
    dm.setup("fit")
    n_train = len(dm.splits[C.SPLIT_TRAIN][LABEL_ROW])
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and batches[0][C.ITEM_IDS].shape == (n_train, 8)
    assert train_batch_size(n_train, 64) == 64
    assert train_batch_size(101, 64, world_size=2) == 50  # one batch per process: its shard
    with pytest.raises(ValueError, match="cannot be shared"):
        train_batch_size(1, 64, world_size=2)


def _copy_lake(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_new_table_version_is_recorded(tiny_lake, tmp_path):
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path = C.LakePaths(str(lake)).table(C.T_USERS)
    table = DeltaTable(path).to_pyarrow_table()
    write_deltalake(path, table, mode="overwrite")
    assert _dm(lake).input_versions[C.T_USERS] == 1


def test_missing_pseudo_context_is_an_error(tiny_lake, tmp_path):
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path = C.LakePaths(str(lake)).table(C.T_CONTEXT_ROWS)
    table = DeltaTable(path).to_pyarrow_table()
    write_deltalake(path, table.slice(1), mode="overwrite")  # drops one pseudo row
    with pytest.raises(ValueError, match="1 sequences rows have no 'pseudo' context row"):
        _dm(lake)


def test_label_outside_the_catalog_is_an_error(tiny_lake, tmp_path):
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path = C.LakePaths(str(lake)).table(C.T_ITEMS)
    table = DeltaTable(path).to_pyarrow_table()
    keep = pa.array(np.arange(table.num_rows) >= 1)
    write_deltalake(path, table.filter(keep), mode="overwrite")
    with pytest.raises(ValueError, match="label items are not in the items table"):
        _dm(lake)


def _context_rows(lake):
    path = C.LakePaths(str(lake)).table(C.T_CONTEXT_ROWS)
    return path, DeltaTable(path).to_pyarrow_table()


def test_examples_without_a_subject_have_no_real_context(tiny_lake, tmp_path):
    """Real rows dropped for two examples: their real context is all padding, their subject -1;
    a subject id beyond 2**53 survives exactly and, outside the catalog, has row -1."""
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path, table = _context_rows(lake)
    frame = table.to_pandas(integer_object_nulls=True)
    real = np.flatnonzero((frame[C.CONTEXT_SOURCE] == C.CONTEXT_REAL).to_numpy())
    big = 2**60 + 1
    frame.loc[real[2], C.SUBJECT_ITEM_ID] = big
    frame = frame.drop(index=real[:2])
    write_deltalake(path, pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False),
                    mode="overwrite")
    dm = _dm(lake)
    seqs = DeltaTable(C.LakePaths(str(lake)).table(C.T_SEQUENCES)).to_pandas()
    gone = {tuple(frame_key) for frame_key in table.to_pandas().iloc[real[:2]][C.SEQUENCES_KEY]
            .itertuples(index=False)}
    for split in C.SPLITS:
        t = dm.splits[split]
        part = seqs[seqs[C.SPLIT] == split].reset_index(drop=True)
        missing = np.array([tuple(k) in gone for k in part[C.SEQUENCES_KEY].itertuples(index=False)])
        assert np.array_equal(~t[HAS_REAL_CONTEXT].numpy(), missing), split
        assert (t[SUBJECT_ITEM_ID][missing] == NO_SUBJECT).all()
        assert (t[SUBJECT_ROW][missing] == NO_SUBJECT).all()
        assert (t[REAL_CONTEXT_IDS][missing] == features.PAD_CATEGORY).all()
        assert (t[REAL_CONTEXT_WEIGHTS][missing] == 0).all()
    everything = torch.cat([dm.splits[s][SUBJECT_ITEM_ID] for s in C.SPLITS])
    rows = torch.cat([dm.splits[s][SUBJECT_ROW] for s in C.SPLITS])
    assert int((everything == big).sum()) == 1 and int(rows[everything == big]) == NO_SUBJECT
    assert int((everything == NO_SUBJECT).sum()) == 2


def test_context_rows_of_an_older_build_are_refused_with_what_to_do(tiny_lake, tmp_path):
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path, table = _context_rows(lake)
    write_deltalake(path, table.drop_columns([C.SUBJECT_ITEM_ID]), mode="overwrite",
                    schema_mode="overwrite")
    with pytest.raises(ValueError, match="lacks columns .'subject_item_id'.*rerun build_sequences"):
        _dm(lake)


def test_a_real_row_without_its_subject_is_an_error(tiny_lake, tmp_path):
    lake = _copy_lake(tiny_lake, tmp_path / "lake")
    path, table = _context_rows(lake)
    frame = table.to_pandas(integer_object_nulls=True)
    frame.loc[(frame[C.CONTEXT_SOURCE] == C.CONTEXT_REAL).to_numpy().nonzero()[0][0],
              C.SUBJECT_ITEM_ID] = None
    write_deltalake(path, pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False),
                    mode="overwrite")
    with pytest.raises(ValueError, match="1 real context rows have no subject_item_id"):
        _dm(lake)


def test_context_top_k_comes_from_the_lakes_build_config(tmp_path):
    """The k the context rows were built with reaches the datamodule (and from there the bundle
    manifest); a lake built before the build config was stored falls back to the default."""
    from synthetic_lake import FixtureSpec, write_lake

    spec = FixtureSpec(n_users=40, n_items=60, n_categories=6, context_top_k=2)
    write_lake(tmp_path / "k2", spec)
    dm = ContextualSequenceDataModule(str(tmp_path / "k2"), max_len=8, max_ctx=3)
    dm.setup()
    assert dm.context_top_k == 2
    ctx = DeltaTable(C.LakePaths(str(tmp_path / "k2")).table(C.T_CONTEXT_ROWS)).to_pandas()
    assert ctx[C.CONTEXT_CATEGORY_IDS].map(len).max() == 2

    shutil.rmtree(tmp_path / "k2" / C.META_DIR)  # as built before the config was stored
    old = ContextualSequenceDataModule(str(tmp_path / "k2"), max_len=8, max_ctx=3)
    old.setup()
    assert old.context_top_k == C.DEFAULT_CONTEXT_TOP_K


# ------------------------------------------------------------------------------ length buckets
def test_length_bucketed_sorts_each_run_of_k_batches_and_shuffles_the_batches():
    rows = torch.tensor([5, 0, 3, 1, 4, 2, 6])  # (7,) an epoch's random order
    lengths = torch.tensor([9, 1, 7, 3, 5, 2, 8])  # (7,) by row id
    g = torch.Generator().manual_seed(0)
    batches = length_bucketed(rows, lengths, batch_size=2, k=2, generator=g)
    # runs of k x batch_size = 4 rows, 2 batches each: [5, 0, 3, 1] (lengths 2, 9, 3, 1) sorted
    # -> [1, 5, 3 | 0] (sums 6 and 9); [4, 2, 6] (lengths 5, 7, 8) -> [4, 2 | 6] (12 and 8)
    expected = {(1, 5, 3), (0,), (4, 2), (6,)}
    assert {tuple(b.tolist()) for b in batches} == expected
    assert len(batches) == 4
    orders = {tuple(tuple(b.tolist()) for b in length_bucketed(
        rows, lengths, 2, 2, torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(orders) > 1  # the batch order is shuffled


def test_sharded_batches_with_length_buckets_keep_the_epochs_rows_and_group_lengths():
    n, bs = 300, 10
    lengths = torch.randint(1, 200, (n,), generator=torch.Generator().manual_seed(1))
    plain = ShardedBatches(n, bs, shuffle=True, drop_last=True, seed=3)
    bucketed = ShardedBatches(n, bs, shuffle=True, drop_last=True, seed=3, lengths=lengths,
                              length_buckets=5)
    for s in (plain, bucketed):
        s.set_epoch(2)
    a, b = list(plain), list(bucketed)
    assert len(a) == len(b) == len(bucketed) == n // bs
    assert sorted(i for x in a for i in x) == sorted(i for x in b for i in x)  # same rows
    tokens = [int(lengths[x].sum()) for x in b]  # (batches,) positions per batch
    assert max(tokens) < 1.5 * sum(tokens) / len(tokens)  # about equal work per step

    def padding(batches):  # encoder positions that are padding: batch size x longest - real
        return sum(len(x) * int(lengths[x].max()) - int(lengths[x].sum()) for x in batches)

    assert padding(b) < padding(a) / 2
    again = ShardedBatches(n, bs, shuffle=True, drop_last=True, seed=3, lengths=lengths,
                           length_buckets=5)
    again.set_epoch(2)
    assert list(again) == b  # a function of (seed, epoch): a resumed run gets the same batches
    again.set_epoch(3)
    assert list(again) != b
    evaluation = ShardedBatches(n, bs, shuffle=False, drop_last=False, lengths=lengths, length_buckets=5)
    assert [i for x in evaluation for i in x] == list(range(n))  # evaluation keeps row order
    with pytest.raises(ValueError, match="length of every row"):
        ShardedBatches(n, bs, shuffle=True, drop_last=True, length_buckets=5)
    with pytest.raises(ValueError, match="length_buckets must be >= 0"):
        ShardedBatches(n, bs, shuffle=True, drop_last=True, lengths=lengths, length_buckets=-1)


def test_equal_length_cuts_balance_summed_lengths_and_never_leave_a_batch_empty():
    assert equal_length_cuts(torch.tensor([1, 1, 1, 1, 10, 10]), 3) == [4, 5]  # sums 4, 10, 10
    assert equal_length_cuts(torch.tensor([2, 2, 2, 2, 2, 2]), 3) == [2, 4]
    assert equal_length_cuts(torch.tensor([1, 1, 1]), 3) == [1, 2]  # one row each
    assert equal_length_cuts(torch.tensor([0, 0, 50]), 2) == [2]  # zero lengths count as 1
    assert equal_length_cuts(torch.tensor([7]), 1) == []
    with pytest.raises(ValueError, match="cannot cut 2 rows into 3"):
        equal_length_cuts(torch.tensor([1, 1]), 3)


def test_history_lengths_count_real_events_of_left_padded_rows():
    pad = features.PAD_ITEM
    ids = torch.tensor([[pad, pad, 4], [pad, 7, 8], [1, 2, 3], [pad, pad, pad]])  # (4, 3)
    assert features.history_lengths(ids).tolist() == [1, 2, 3, 0]
