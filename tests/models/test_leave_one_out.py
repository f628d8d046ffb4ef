"""The MovieLens protocol (models/leave_one_out.py) on tiny hand-made frames: leave-one-out by
time with ties, history exclusion, HR@10 / NDCG@10 against a naive reference, the
all_positions objective against a hand computation, and one short fit from the YAML config."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models import leave_one_out as loo
from models.data import EXCLUDE_ROWS, LABEL_ROW
from models.system import ContextualRetrievalSystem, next_item_targets, uniform_negatives_loss
from models.two_tower import ModelConfig
import ctt_contracts as C

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "movielens.yaml"
SIDE_INFO = ROOT / "configs" / "movielens_side_info.yaml"


def events(rows):
    return pd.DataFrame(rows, columns=[C.USER_ID, C.ITEM_ID, C.EVENT_TS])


# Rows deliberately unordered. User 1: items 3 and 5 in the same second (tie -> item id order),
# user 2: two events only (dropped), user 3: exactly three events.
HAND = events([
    (1, 7, 200), (1, 5, 100), (3, 30, 10), (1, 3, 100), (2, 4, 5), (1, 9, 50),
    (3, 31, 20), (2, 8, 6), (3, 9, 30),
])


# ------------------------------------------------------------------------------ split
def test_leave_one_out_orders_by_time_then_item_and_splits_last_two():
    split = loo.leave_one_out(HAND)
    assert split.users.tolist() == [1, 3]
    assert split.users_dropped == 1  # user 2 has two events
    train = split.train[[C.USER_ID, C.ITEM_ID, loo.TS_MS]].values.tolist()
    # user 1: 9 (t=50), 3 (t=100, tie index 0), 5 (t=100, tie index 1), 7 (t=200)
    assert train == [[1, 9, 50_000], [1, 3, 100_000], [3, 30, 10_000]]
    assert split.val[[C.USER_ID, C.ITEM_ID, loo.TS_MS]].values.tolist() == [[1, 5, 100_001], [3, 31, 20_000]]
    assert split.test[[C.USER_ID, C.ITEM_ID]].values.tolist() == [[1, 7], [3, 9]]
    assert split.catalog.tolist() == [3, 9, 30]  # items with a train interaction


def test_tie_break_is_independent_of_input_row_order():
    shuffled = HAND.sample(frac=1.0, random_state=3)
    a, b = loo.leave_one_out(HAND), loo.leave_one_out(shuffled)
    assert loo.split_fingerprint(a) == loo.split_fingerprint(b)
    assert loo.split_fingerprint(a) != loo.split_fingerprint(loo.leave_one_out(HAND.iloc[:-1]))


def test_split_rejects_what_it_cannot_order():
    with pytest.raises(ValueError, match="null"):
        loo.leave_one_out(events([(1, 2, None), (1, 3, 4), (1, 4, 5)]))
    with pytest.raises(ValueError, match="1000 events"):
        loo.leave_one_out(events([(1, i, 7) for i in range(1001)]))
    with pytest.raises(ValueError, match="no user"):
        loo.leave_one_out(events([(1, 2, 3), (1, 3, 4)]))


def test_histories_are_train_for_validation_and_train_plus_val_for_test():
    split = loo.leave_one_out(HAND)
    val = loo.grouped(loo.history_frame(split, C.SPLIT_VAL), split.users, C.ITEM_ID)
    test = loo.grouped(loo.history_frame(split, C.SPLIT_TEST), split.users, C.ITEM_ID)
    assert [h.tolist() for h in val] == [[9, 3], [30]]
    # user 1's validation item 5 and user 3's 31 have no train interaction: not in the catalog,
    # so not in the ranked history either (RecTools drops unknown items the same way)
    assert [h.tolist() for h in test] == [[9, 3], [30]]
    assert loo.targets(split, C.SPLIT_TEST).tolist() == [7, 9]


# ------------------------------------------------------------------------------ metric
def naive_hr_ndcg(scores: np.ndarray, targets, histories, k: int = 10):
    """Reference: sort every user's non-history items by score, find the target's rank."""
    hr = ndcg = 0.0
    for u, target in enumerate(targets):
        ranked = sorted((i for i in range(scores.shape[1]) if i not in histories[u]),
                        key=lambda i: -scores[u, i])
        if target in ranked[:k]:
            rank = ranked.index(target)
            hr += 1.0
            ndcg += 1.0 / math.log2(rank + 2)
    return hr / len(targets), ndcg / len(targets)


def test_hit_ndcg_by_hand():
    lists = [[4, 1, 2], [0, 1, 2, 3], list(range(20, 40)), []]
    targets = [4, 2, 30, 5]  # rank 0, rank 2, rank 10 (outside the top 10), no list
    got = loo.hit_ndcg_at_k(lists, targets)
    assert got[loo.HR] == pytest.approx(2 / 4)
    assert got[loo.NDCG] == pytest.approx((1.0 + 1.0 / math.log2(4)) / 4)
    with pytest.raises(ValueError, match="lists but"):
        loo.hit_ndcg_at_k(lists, targets[:2])


def test_top_rows_with_history_excluded_match_the_naive_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 30, generator=g)  # 6 users x 30 items, distinct scores
    histories = [[0, 1, 2], [], [5], list(range(10)), [29, 28], [7, 3, 11]]
    exclude = torch.full((6, 10), -1, dtype=torch.long)
    for u, h in enumerate(histories):
        exclude[u, : len(h)] = torch.tensor(h, dtype=torch.long)
    # each target: the best non-history item for users 0-2, then ranks 3, 12 and 9
    order = [[i for i in scores[u].argsort(descending=True).tolist() if i not in histories[u]]
             for u in range(6)]
    targets = [order[0][0], order[1][0], order[2][0], order[3][3], order[4][12], order[5][9]]
    lists = loo.top_rows(scores, exclude, k=100)
    assert all(not set(lst) & set(h) for lst, h in zip(lists, histories))
    assert [len(lst) for lst in lists] == [30 - len(h) for h in histories]
    got = loo.hit_ndcg_at_k(lists, targets)
    hr, ndcg = naive_hr_ndcg(scores.numpy(), targets, histories)
    assert got[loo.HR] == pytest.approx(hr) and got[loo.NDCG] == pytest.approx(ndcg)
    assert hr == pytest.approx(5 / 6)  # the rank-12 target is the one miss


# ------------------------------------------------------------------------------ tensors
def synthetic_log(n_users: int = 40, n_items: int = 25, seed: int = 0) -> pd.DataFrame:
    """Users walk through the items in order from a random start, one a minute."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start = int(rng.integers(0, n_items))
        for j in range(int(rng.integers(3, 12))):
            rows.append((u, (start + j) % n_items, 1_000_000 + 60 * j))
    return events(rows)


@pytest.fixture
def inputs(tmp_path):
    """events / items / users Parquet of a tiny log; one validation target is outside the catalog."""
    log = synthetic_log()
    # user 1000: train 0, 1, validation 99 (never trained on), test 2
    log = pd.concat([log, events([(1000, 0, 10), (1000, 1, 20), (1000, 99, 30), (1000, 2, 40)])])
    items = pd.DataFrame({C.ITEM_ID: np.arange(100), C.CATEGORY_IDS: [[i % 4] for i in range(100)],
                          C.CATEGORY_WEIGHTS: [[1.0]] * 100, C.ADVERTISER_ID: 0})
    users = pd.DataFrame({C.USER_ID: log[C.USER_ID].unique(), C.AGE_BUCKET: 3, C.COUNTRY: "unknown",
                          C.GENDER: "f"})
    paths = {}
    for name, frame in (("events", log), ("items", items), ("users", users)):
        paths[name] = tmp_path / f"{name}.parquet"
        frame.to_parquet(paths[name], index=False)
    return paths


def datamodule(inputs, max_len: int = 6) -> loo.LeaveOneOutDataModule:
    dm = loo.LeaveOneOutDataModule(str(inputs["events"]), str(inputs["items"]), str(inputs["users"]),
                                   batch_size=8, eval_batch_size=16, max_len=max_len, max_ctx=3,
                                   max_item_categories=2, country_buckets=8)
    dm.setup("fit")
    return dm


def test_datamodule_tensors_follow_the_split(inputs):
    dm = datamodule(inputs)
    split, cat = dm.split, dm.catalog
    u = int(np.nonzero(split.users == 1000)[0][0])
    train, val, test = (dm.splits[s] for s in C.SPLITS)
    assert train[C.ITEM_IDS][u].tolist()[-1:] == [0] and int(train[C.LABEL_ITEM_ID][u]) == 1
    assert val[C.ITEM_IDS][u].tolist()[-2:] == [0, 1] and int(val[LABEL_ROW][u]) == -1  # 99: outside
    assert test[C.ITEM_IDS][u].tolist()[-2:] == [0, 1]  # 99 is not in the catalog: not in the history
    ex_u = val[EXCLUDE_ROWS][u]
    assert sorted(ex_u[ex_u >= 0].tolist()) == cat.find_rows(np.array([0, 1])).tolist()
    # every validation row excludes exactly its user's whole train history
    for i, user in enumerate(split.users):
        hist = split.train.loc[split.train[C.USER_ID] == user, C.ITEM_ID].to_numpy()
        ex = val[EXCLUDE_ROWS][i]
        assert sorted(ex[ex >= 0].tolist()) == sorted(cat.find_rows(hist).tolist())
    # training target counts: every history event but the first, plus the label
    expected = np.zeros(len(cat))
    for user in split.users:
        seq = split.train.loc[split.train[C.USER_ID] == user, C.ITEM_ID].to_numpy()[-(6 + 1):]
        np.add.at(expected, cat.find_rows(seq[1:]), 1)
    assert dm.item_counts.numpy().tolist() == expected.tolist()


# ------------------------------------------------------------------------------ all_positions
def test_next_item_targets_by_hand():
    history = torch.tensor([[-1, -1, 4, 2, 7],
                            [-1, -1, -1, -1, 3],
                            [1, 2, -1, 5, 6]])  # -1 inside a row: an item outside the catalog
    labels = torch.tensor([9, 8, 0])
    assert next_item_targets(history, labels).tolist() == [[-1, -1, 2, 7, 9],
                                                           [-1, -1, -1, -1, 8],
                                                           [2, -1, -1, 6, 0]]


def test_uniform_negatives_loss_by_hand():
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos_rows, neg_rows = torch.tensor([3, 5]), torch.tensor([4, 5])  # row 1 drew its own positive
    tau = 0.5
    l0 = -(0.6 / tau - math.log(math.exp(0.6 / tau) + math.exp(1.0 / tau) + math.exp(0.0)))
    l1 = -(1.0 / tau - math.log(math.exp(1.0 / tau) + math.exp(0.0)))  # column 5 masked
    got = uniform_negatives_loss(user, pos, pos_rows, neg, neg_rows, tau)
    assert got.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


def tiny_system(dm, full_softmax: bool, **config) -> ContextualRetrievalSystem:
    cfg = ModelConfig(dim=8, n_layers=1, n_heads=1, max_len=6, item_buckets=128, category_buckets=16,
                      country_buckets=8, max_ctx=3, max_item_categories=2, mlp_hidden=16,
                      use_context=False, **config)
    torch.manual_seed(0)
    system = ContextualRetrievalSystem(cfg, objective="all_positions", full_softmax=full_softmax,
                                       n_uniform_negatives=7, history_drop_prob=0.0)
    system.attach_data(dm.catalog, dm.item_frequencies(), dm.item_counts)
    return system.eval()  # no dropout: a deterministic function to compare against


def test_all_positions_loss_matches_a_per_position_hand_computation(inputs):
    dm = datamodule(inputs)
    batch = loo.take(dm.splits[C.SPLIT_TRAIN], slice(0, 5))
    system = tiny_system(dm, full_softmax=True)
    item_emb = system.catalog_embeddings()  # (N, D)
    temperature = system.temperature.item()
    terms = []
    for b in range(5):  # no autograd needed: plain floats below
        hist = batch[C.ITEM_IDS][b][batch[C.ITEM_IDS][b] >= 0].tolist()
        seq = hist + [int(batch[C.LABEL_ITEM_ID][b])]
        hidden, _ = system.model.encode_positions(batch[C.ITEM_IDS][b:b + 1],
                                                  batch[C.EVENT_TS][b:b + 1])
        hidden = hidden[0, -len(hist):] if hist else hidden[0, :0]  # the real positions, oldest first
        for t in range(len(hist)):
            demo = [batch[key][b:b + 1] for key in (C.AGE_BUCKET, C.COUNTRY, C.GENDER)]  # the row's
            user = system.model.query_from_state(hidden[t:t + 1], None, None, *demo)[0]
            logits = [(user @ item_emb[j]).item() / temperature for j in range(len(dm.catalog))]
            target = int(dm.catalog.find_rows(np.array([seq[t + 1]]))[0])
            terms.append(-(logits[target] - math.log(sum(math.exp(v) for v in logits))))
    assert len(terms) == int((batch[C.ITEM_IDS] >= 0).sum())  # one example per history event
    assert system.all_positions_loss(batch).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_all_positions_sampled_variant_uses_the_shared_uniform_negatives(inputs):
    dm = datamodule(inputs)
    batch = loo.take(dm.splits[C.SPLIT_TRAIN], slice(0, 4))
    system = tiny_system(dm, full_softmax=False)
    torch.manual_seed(5)
    got = system.all_positions_loss(batch)
    torch.manual_seed(5)
    neg_rows = torch.randint(0, len(dm.catalog), (7,))
    hidden, _ = system.model.encode_positions(batch[C.ITEM_IDS], batch[C.EVENT_TS])
    rows = torch.as_tensor(dm.catalog.find_rows(batch[C.ITEM_IDS].numpy()))
    target = next_item_targets(rows, batch[LABEL_ROW])
    where = target >= 0
    rows_b = where.nonzero(as_tuple=True)[0]
    user = system.model.query_from_state(hidden[where], None, None, batch[C.AGE_BUCKET][rows_b],
                                         batch[C.COUNTRY][rows_b], batch[C.GENDER][rows_b])
    item_emb = system.catalog_embeddings()
    want = uniform_negatives_loss(user, item_emb[target[where]], target[where], item_emb[neg_rows], neg_rows,
                                  system.temperature)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_last_position_is_the_served_state_and_positions_are_causal(inputs):
    dm = datamodule(inputs)
    batch = loo.take(dm.splits[C.SPLIT_TRAIN], slice(0, 6))
    model = tiny_system(dm, full_softmax=True).model
    hidden, valid = model.encode_positions(batch[C.ITEM_IDS], batch[C.EVENT_TS])
    state = model.encode_user_state(batch[C.ITEM_IDS], batch[C.EVENT_TS])
    has = valid[:, -1]
    assert torch.allclose(hidden[has, -1], state[has], atol=1e-6)
    changed = batch[C.ITEM_IDS].clone()
    changed[:, -1] = torch.where(changed[:, -1] >= 0, changed[:, -1] + 1, changed[:, -1])
    hidden2, _ = model.encode_positions(changed, batch[C.EVENT_TS])
    assert torch.allclose(hidden[:, :-1], hidden2[:, :-1], atol=1e-6)  # the newest event is unseen before


def test_all_positions_refuses_a_model_with_context():
    with pytest.raises(ValueError, match="use_context=False"):
        ContextualRetrievalSystem(ModelConfig(dim=8, n_heads=1, use_context=True), objective="all_positions")
    with pytest.raises(ValueError, match="objective"):
        ContextualRetrievalSystem(ModelConfig(dim=8, n_heads=1), objective="every_item")


# ------------------------------------------------------------------------------ validation
def test_system_validation_excludes_history_and_counts_outside_targets_as_misses(inputs):
    """The metric early stopping watches (ranks in validation_step) equals HR/NDCG of the top
    lists the benchmark scores, on the same weights, with the outside target a miss in both."""
    import pytorch_lightning as pl

    dm = datamodule(inputs)
    system = tiny_system(dm, full_softmax=True)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.validate(system, datamodule=dm, verbose=False)[0]
    lists = loo.top_item_lists(system, dm.splits[C.SPLIT_VAL])
    assert all(len(set(lst) & set(h.tolist())) == 0 for lst, h in zip(
        lists, loo.grouped(loo.history_frame(dm.split, C.SPLIT_VAL), dm.split.users, C.ITEM_ID)))
    want = loo.hit_ndcg_at_k(lists, loo.targets(dm.split, C.SPLIT_VAL))
    assert logged[loo.MONITOR] == pytest.approx(want[loo.NDCG], abs=1e-6)
    assert logged["val_no_context/recall_at_10"] == pytest.approx(want[loo.HR], abs=1e-6)


# ------------------------------------------------------------------------------ end to end
def tiny_args(inputs, *configs: Path) -> list:
    """The shipped configs ``configs`` at toy sizes: 2 epochs, dim 8, 128 buckets, batches of 16."""
    return [*(a for c in configs for a in ("--config", str(c))),
            "--data.events_path", str(inputs["events"]), "--data.items_path", str(inputs["items"]),
            "--data.users_path", str(inputs["users"]), "--trainer.max_epochs", "2",
            "--model.model_config.dim", "8", "--model.model_config.max_len", "6",
            "--model.model_config.item_buckets", "128", "--model.model_config.mlp_hidden", "16",
            "--data.batch_size", "16"]


def test_fit_and_test_from_the_yaml_config(inputs):
    result = loo.fit_and_test(tiny_args(inputs, CONFIG, SIDE_INFO))
    assert result["epochs_run"] == 2 and len(result["curve"]) == 2
    assert result["hparams"]["objective"] == "all_positions"
    assert result["hparams"]["model_config"]["use_time_gaps"] is True  # the overlay applied
    assert result["hparams"]["model_config"]["max_len"] == 6
    curve = [c["val_" + loo.NDCG] for c in result["curve"]]
    assert result["best_epoch"] == 1 + int(np.argmax(curve))  # the first epoch reaching the best
    assert result["val"][loo.NDCG] == pytest.approx(curve[result["best_epoch"] - 1], abs=1e-6)
    assert result["history_violations"] == 0
    assert result["wall_to_best_s"] <= result["train_wall_s"]
    assert 0.0 <= result[loo.HR] <= 1.0 and result["split"]["users"] == 41


def test_the_config_validates_and_checkpoints_the_averaged_weights(inputs, tmp_path):
    """configs/movielens.yaml averages the weights (models.averaging.WeightEMA): the checkpoint
    holds the average, the raw weights ride beside it, and the integer hash coefficients (buffers)
    are not averaged."""
    cli = loo.build([*tiny_args(inputs, CONFIG), "--trainer.default_root_dir", str(tmp_path)])
    system, dm, trainer = cli.model, cli.datamodule, cli.trainer
    buffers = {k: v.clone() for k, v in system.named_buffers()}
    assert any(not b.is_floating_point() for b in buffers.values())
    trainer.fit(system, datamodule=dm)
    ckpt = torch.load(loo.best_checkpoint(trainer), map_location="cpu", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == raw.keys() == system.state_dict().keys()
    for name, before in buffers.items():
        assert torch.equal(averaged[name], before) and torch.equal(raw[name], before), name
    moved = [k for k, v in averaged.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    assert moved  # the average lags the raw weights
    system.load_state_dict(averaged)
    lists = loo.top_item_lists(system, dm.splits[C.SPLIT_VAL], loo.TOP_N)
    monitored = trainer.checkpoint_callback.best_model_score.item()
    assert loo.evaluate_lists(dm, C.SPLIT_VAL, lists)[loo.NDCG] == pytest.approx(monitored, abs=1e-6)
