"""ContextualTwoTower: split-path parity, cold start, config round trip."""
from __future__ import annotations

import pytest
import torch

from models.two_tower import ContextualTwoTower, ModelConfig


@pytest.mark.parametrize("overrides", [
    {},  # concat, last hidden state
    {"fusion": "cross_attention", "state_len": 4},
    {"fusion": "concat", "state_len": 2, "use_demographics": False},
    {"use_context": False, "use_demographics": False},  # sequence-only
    {"tower_skip": True, "use_subject_item": True},
    {"tower_skip": True, "use_context": False, "use_demographics": False},
    {"use_context": False, "use_demographics": False, "fusion": "identity", "item_tower": "embedding"},
])
def test_query_from_state_of_encoded_state_equals_forward(overrides, tiny_config, random_inputs):
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    model = ContextualTwoTower(cfg).eval()
    x = random_inputs(cfg, batch=7)
    with torch.no_grad():
        full = model(*x)
        state = model.encode_user_state(x[0], x[1])
        split = model.query_from_state(state, *x[2:])
    assert state.shape == (7, model.state_dim)
    assert torch.allclose(full, split, atol=1e-5)
    assert torch.allclose(full.norm(dim=-1), torch.ones(7), atol=1e-5)


def test_cold_start_uses_learned_no_history_state(tiny_config, random_inputs):
    cfg = tiny_config()
    model = ContextualTwoTower(cfg).eval()
    _, _, ctx, w, age, country, gender = random_inputs(cfg, batch=3)
    empty = torch.full((3, cfg.max_len), -1)
    with torch.no_grad():
        cold = model.query_from_state(None, ctx, w, age, country, gender)
        empty_history = model(empty, torch.zeros_like(empty), ctx, w, age, country, gender)
        state = model.encode_user_state(empty, torch.zeros_like(empty))
    assert torch.allclose(cold, empty_history, atol=1e-6)
    assert torch.equal(state, model.no_history_state.expand(3, -1))


def test_query_from_state_validates_inputs(tiny_config, random_inputs):
    cfg = tiny_config()
    model = ContextualTwoTower(cfg).eval()
    _, _, ctx, w, age, country, gender = random_inputs(cfg, batch=2)
    with pytest.raises(ValueError, match="state must be"):
        model.query_from_state(torch.zeros(2, cfg.state_dim + 1), ctx, w, age, country, gender)
    with pytest.raises(ValueError, match="uses context"):
        model.query_from_state(None, None, None, age, country, gender)


def test_config_round_trip_and_validation(tiny_config):
    cfg = tiny_config(fusion="cross_attention", state_len=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.state_dim == 2 * cfg.dim
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig(fusion="sum")
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(dim=10, n_heads=3)
    with pytest.raises(ValueError, match="item_tower"):
        ModelConfig(item_tower="transformer")
    with pytest.raises(ValueError, match="identity"):
        ModelConfig(fusion="identity")  # context and demographics on by default
    with pytest.raises(ValueError, match="fusion_residual"):
        ModelConfig(fusion="identity", fusion_residual=True, use_context=False, use_demographics=False)


def test_sasrec_like_towers_are_the_state_and_the_tied_embeddings(tiny_config, random_inputs):
    """fusion identity + item_tower embedding: the query is the normalised last encoder state and
    an item is its normalised id embedding, the same vectors the encoder reads as tokens."""
    import torch.nn.functional as F

    cfg = tiny_config(use_context=False, use_demographics=False, fusion="identity",
                      item_tower="embedding", use_item_categories=False)
    model = ContextualTwoTower(cfg).eval()
    x = random_inputs(cfg, batch=5)
    items = torch.arange(1, 9)
    no_cats = torch.full((8, cfg.max_item_categories), -1)
    with torch.no_grad():
        state = model.encode_user_state(x[0], x[1])
        assert torch.allclose(model(*x), F.normalize(state, dim=-1), atol=1e-6)
        got = model.item_embeddings(items, no_cats, torch.zeros(8, cfg.max_item_categories))
        assert torch.allclose(got, F.normalize(model.item_emb(items), dim=-1), atol=1e-6)
    assert sum(p.numel() for p in model.fusion.parameters()) == 0
    assert sum(p.numel() for p in model.item_tower.parameters()) == 0


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_the_residual_fusion_is_the_normalised_last_state_plus_the_mlp(tiny_config, random_inputs, fusion):
    """With the MLP's last layer zeroed, the residual query is the normalised last state slot;
    without the residual it would be the zero vector's normalisation (all zeros)."""
    import torch.nn.functional as F

    cfg = tiny_config(fusion=fusion, state_len=2, fusion_residual=True)
    model = ContextualTwoTower(cfg).eval()
    x = random_inputs(cfg, batch=5)
    with torch.no_grad():
        model.fusion.mlp[-1].weight.zero_()
        model.fusion.mlp[-1].bias.zero_()
        state = model.encode_user_state(x[0], x[1])  # (B, 2 * D)
        assert torch.allclose(model(*x), F.normalize(state[:, -cfg.dim:], dim=-1), atol=1e-6)
        model.fusion.residual = False
        assert torch.equal(model(*x), torch.zeros(5, cfg.dim))


def test_subject_item_embedding_moves_the_query_and_keeps_split_parity(tiny_config, random_inputs):
    torch.manual_seed(0)
    cfg = tiny_config(use_subject_item=True)
    model = ContextualTwoTower(cfg).eval()
    x = random_inputs(cfg, batch=4)
    subject = torch.nn.functional.normalize(torch.randn(4, cfg.dim), dim=-1)  # (B, D)
    with torch.no_grad():
        full = model(*x, subject)
        split = model.query_from_state(model.encode_user_state(x[0], x[1]), *x[2:], subject)
        without = model(*x)
        zero = model(*x, torch.zeros(4, cfg.dim))
    assert torch.allclose(full, split, atol=1e-5)
    assert torch.allclose(without, zero, atol=1e-6)  # a zero subject embedding is "no subject"
    assert not torch.allclose(full, without, atol=1e-3)
    with pytest.raises(ValueError, match="use_subject_item needs use_context"):
        tiny_config(use_subject_item=True, use_context=False)


def test_id_gate_zero_leaves_the_item_to_its_categories(tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ContextualTwoTower(cfg).eval()
    cats = torch.tensor([[3, 5], [3, 5]])  # (2, C): two items with the same categories
    w = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    ids = torch.tensor([11, 12])
    with torch.no_grad():
        gated = model.item_embeddings(ids, cats, w, torch.zeros(2))
        full = model.item_embeddings(ids, cats, w)
        ones = model.item_embeddings(ids, cats, w, torch.ones(2))
    assert torch.allclose(gated[0], gated[1], atol=1e-6)  # ids gated out: categories alone
    assert not torch.allclose(full[0], full[1], atol=1e-3)
    assert torch.allclose(full, ones, atol=1e-6)


def test_tower_skip_matches_the_subject_category_before_any_training(tiny_config):
    """With the skip path an untrained model already ranks the items of the context's category
    above the others (the inductive bias that lets rare categories work)."""
    torch.manual_seed(0)
    cfg = tiny_config(tower_skip=True, dim=64, category_buckets=4096)
    model = ContextualTwoTower(cfg).eval()
    n = 200
    item_ids = torch.arange(n)
    cats = (item_ids % 50).unsqueeze(1)  # (N, 1): 50 categories of 4 items
    with torch.no_grad():
        items = model.item_embeddings(item_ids, cats, torch.ones(n, 1), torch.zeros(n))  # (N, D)
        ctx = torch.tensor([[7]])
        user = model.query_from_state(None, ctx, torch.ones(1, 1), torch.zeros(1, dtype=torch.long),
                                      torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    top4 = (user @ items.T).topk(4).indices[0]
    assert sorted((top4 % 50).tolist()) == [7, 7, 7, 7]


def test_mean_category_pool_weighs_every_listed_category_alike():
    """A taxonomy's weights (leaf 4/7, parent 2/7, top 1/7) make an item sharing only the parent
    with the context score far below one sharing the leaf; the mean pool counts each level once."""
    cat_ids = torch.tensor([[5, 9, 12], [7, -1, -1], [-1, -1, -1]])
    cat_weights = torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weighted = ContextualTwoTower(ModelConfig(dim=8, n_heads=2))
    mean = ContextualTwoTower(ModelConfig(dim=8, n_heads=2, item_category_pool="mean"))
    assert torch.equal(weighted._pool_weights(cat_ids, cat_weights), cat_weights)
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(mean._pool_weights(cat_ids, cat_weights), expected)
    with pytest.raises(ValueError, match="item_category_pool"):
        ModelConfig(item_category_pool="max")
