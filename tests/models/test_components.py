"""Pure nn.Modules: shapes, multi-hash ids, causality, padding invariance, the encoder's dropout,
context dropout."""
from __future__ import annotations

import torch

from models.components.context import (ContextLayer, DemographicsEmbedding, drop_context_slots,
                                       swap_context_slots)
from models.components.embeddings import MultiHashEmbedding, weighted_pool
from models.components.encoder import CausalSequenceEncoder, UniformDropout
from models.components.heads import ConcatFusion, CrossAttentionFusion, ItemTower
from models import two_tower
from models.two_tower import ContextualTwoTower


def test_multi_hash_embedding_shapes_padding_and_determinism():
    emb = MultiHashEmbedding(num_buckets=64, dim=8, n_hashes=3, seed=1)
    ids = torch.tensor([[5, -1, 2**40 + 7], [0, 5, -1]])
    out = emb(ids)
    assert out.shape == (2, 3, 8)
    assert torch.equal(out[0, 1], torch.zeros(8)) and torch.equal(out[1, 2], torch.zeros(8))
    assert torch.equal(out[0, 0], out[1, 1])  # same id, same vector
    rows = emb.bucket_ids(torch.tensor([5]))
    assert rows.shape == (1, 3)
    assert ((rows >= emb.offsets) & (rows < emb.offsets + 64)).all()  # each hash in its own block
    again = MultiHashEmbedding(num_buckets=64, dim=8, n_hashes=3, seed=1)
    assert torch.equal(again.bucket_ids(ids), emb.bucket_ids(ids))  # hashes are a function of seed


def test_multi_hash_separates_ids_that_collide_in_one_hash():
    emb = MultiHashEmbedding(num_buckets=16, dim=4, n_hashes=2, seed=0)
    rows = emb.bucket_ids(torch.arange(200))
    first_collisions = (rows[:, 0].unsqueeze(0) == rows[:, 0].unsqueeze(1)).sum() - 200
    both_collisions = ((rows.unsqueeze(0) == rows.unsqueeze(1)).all(-1)).sum() - 200
    assert first_collisions > 0  # 200 ids into 16 rows must collide ...
    assert both_collisions < first_collisions / 4  # ... but rarely under both hashes


def test_weighted_pool():
    emb = torch.arange(12.0).reshape(1, 3, 4)
    w = torch.tensor([[0.5, 0.5, 0.0]])
    assert torch.allclose(weighted_pool(emb, w), (emb[0, 0] + emb[0, 1]) / 2)
    assert torch.equal(weighted_pool(emb, torch.zeros(1, 3)), torch.zeros(1, 4))


def _encoder():
    torch.manual_seed(0)
    return CausalSequenceEncoder(dim=16, n_layers=2, n_heads=2, max_len=10, n_time_buckets=8,
                                 dropout=0.0).eval()


def test_encoder_is_causal():
    enc = _encoder()
    tokens = torch.randn(2, 6, 16)
    gaps = torch.randint(1, 8, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    out = enc(tokens, gaps, valid)
    assert out.shape == (2, 6, 16)
    changed = tokens.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)  # change the future
    out2 = enc(changed, gaps, valid)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)
    assert not torch.allclose(out[:, 4:], out2[:, 4:], atol=1e-3)


def test_uniform_dropout_keeps_1_minus_p_scaled_and_is_off_in_eval():
    torch.manual_seed(0)
    drop = UniformDropout(0.25)
    x = torch.rand(200, 500) + 0.5  # no zeros of its own
    out = drop(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(out[kept], x[kept] / 0.75)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(UniformDropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(UniformDropout(0.0)(x), x)
    assert drop.train()(x.to(torch.bfloat16)).dtype == torch.bfloat16  # mixed precision keeps its dtype


def test_encoder_dropout_modules_and_attention_rate():
    enc = CausalSequenceEncoder(dim=16, n_layers=2, n_heads=2, max_len=10, n_time_buckets=8,
                                dropout=0.3)
    layers = list(enc.layers.layers)
    for layer in layers:
        assert all(isinstance(m, UniformDropout) and m.p == 0.3
                   for m in (layer.dropout, layer.dropout1, layer.dropout2))
    assert [layer.self_attn.dropout for layer in layers] == [0.3, 0.3]  # None: the same as dropout
    assert isinstance(enc.input_dropout, UniformDropout)
    no_attn = CausalSequenceEncoder(dim=16, n_layers=2, n_heads=2, max_len=10, n_time_buckets=8,
                                    dropout=0.3, attention_dropout=0.0)
    assert [layer.self_attn.dropout for layer in no_attn.layers.layers] == [0.0, 0.0]
    assert no_attn.layers.layers[0].dropout1.p == 0.3


def test_encoder_ignores_left_padding():
    enc = _encoder()
    tokens = torch.randn(1, 3, 16)
    gaps = torch.tensor([[1, 3, 4]])
    short = enc(tokens, gaps, torch.ones(1, 3, dtype=torch.bool))
    padded_tokens = torch.cat([torch.randn(1, 4, 16) * 5, tokens], dim=1)  # garbage in padding
    padded_gaps = torch.cat([torch.zeros(1, 4, dtype=torch.long), gaps], dim=1)
    valid = torch.tensor([[False] * 4 + [True] * 3])
    long = enc(padded_tokens, padded_gaps, valid)
    assert torch.isfinite(long).all()
    assert torch.allclose(long[:, 4:], short, atol=1e-5)


def test_model_state_is_invariant_to_padding_length(tiny_config):
    cfg = tiny_config(max_len=8, dropout=0.0)
    model = ContextualTwoTower(cfg).eval()
    items = torch.tensor([[11, 12, 13]])
    ts = torch.tensor([[1_700_000_000, 1_700_000_600, 1_700_090_000]])
    pad = torch.full((1, 5), -1)
    padded_items = torch.cat([pad, items], dim=1)
    padded_ts = torch.cat([torch.zeros(1, 5, dtype=torch.long), ts], dim=1)
    with torch.no_grad():
        a = model.encode_user_state(items, ts)
        b = model.encode_user_state(padded_items, padded_ts)
    assert torch.allclose(a, b, atol=1e-6)


def test_a_large_batch_is_encoded_in_length_sorted_chunks_in_the_input_order(tiny_config, monkeypatch):
    """Rows of mixed lengths (empty ones too), more than one chunk: the same states as row by row,
    and the chunks are runs of rows of non-decreasing length."""
    cfg = tiny_config(max_len=8, dropout=0.0)
    model = ContextualTwoTower(cfg).eval()
    g = torch.Generator().manual_seed(0)
    n, length = 7, 8
    lengths = torch.tensor([8, 0, 3, 1, 8, 5, 2])  # (n,)
    items = torch.randint(1, 50, (n, length), generator=g)  # (n, L)
    items[torch.arange(length).unsqueeze(0) < (length - lengths).unsqueeze(1)] = -1  # left padding
    ts = torch.arange(length).repeat(n, 1) * 3_600 + 1_700_000_000  # (n, L)
    order, chunks = two_tower.length_sorted_chunks(items, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert torch.equal(lengths[order], lengths.sort(stable=True).values)
    monkeypatch.setattr(two_tower, "STATE_CHUNK_ROWS", 3)
    with torch.no_grad():
        chunked = model.encode_user_state(items, ts)  # (n, S)
        one_by_one = torch.cat([model.encode_user_state(items[i:i + 1], ts[i:i + 1])
                                for i in range(n)])  # (n, S)
    assert torch.allclose(chunked, one_by_one, atol=1e-5)


def test_context_layer_dropout_modes():
    torch.manual_seed(0)
    layer = ContextLayer(dim=8, context_dropout=0.5, context_drop_prob=0.5)
    pooled = torch.randn(2000, 8)
    layer.train()
    out = layer(pooled)
    dropped_rows = (out.abs().sum(1) == 0).float().mean()
    assert 0.4 < dropped_rows < 0.6  # whole-context dropout
    kept = out[out.abs().sum(1) > 0]
    assert 0.35 < (kept == 0).float().mean() < 0.65  # elementwise dropout on the kept rows
    layer.eval()
    assert torch.allclose(layer(pooled), layer.proj(pooled))  # no dropout at serving
    assert torch.equal(layer(torch.zeros(3, 8)), torch.zeros(3, 8))  # no context stays zero


def test_drop_context_slots_keeps_the_strongest_and_renormalises():
    torch.manual_seed(0)
    w = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).repeat(500, 1)
    out = drop_context_slots(w, 0.5)  # (1500, 4)
    assert out[1::3].abs().sum() == 0  # no context stays no context
    assert torch.equal(out[2::3], w[2::3])  # a single category is never dropped
    first = out[0::3]
    assert torch.all(first[:, 1] > 0) and torch.all(first[:, 3] == 0)  # strongest kept, pad stays pad
    assert torch.allclose(first.sum(dim=1), torch.ones(500))
    dropped = (first[:, [0, 2]] == 0).float().mean()
    assert 0.4 < dropped < 0.6  # each weaker slot dropped about half the time
    assert torch.equal(drop_context_slots(w, 0.0), w)


def test_swap_context_slots_keeps_the_strongest_and_draws_from_the_batch():
    torch.manual_seed(0)
    ids = torch.tensor([[7, 3, 4, -1], [-1, -1, -1, -1], [9, -1, -1, -1]]).repeat(500, 1)  # (1500, 4)
    w = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).repeat(500, 1)
    new_ids, new_w = swap_context_slots(ids, w, 1.0)
    assert torch.equal(new_ids[:, 0], ids[:, 0]) and torch.equal(new_w[1::3], w[1::3])  # strongest / none kept
    assert torch.equal(new_ids[2::3], ids[2::3])  # a single category has nothing to swap
    assert torch.allclose(new_w[0::3].sum(dim=1), torch.ones(500))
    assert torch.all((new_w > 0) == (new_ids >= 0))  # a weight for every id and no id without weight
    second = new_ids[0::3, 1]
    assert set(second.tolist()) <= {3, -1}  # only this slot's categories of the batch, or dropped
    assert 0.55 < (second == -1).float().mean() < 0.8  # dropped where the donor had none (2 of 3 rows)
    assert torch.equal(swap_context_slots(ids, w, 0.0)[0], ids)


def test_heads_and_demographics_shapes_and_norms():
    b, m, d = 5, 3, 16
    states, ctx, demo = torch.randn(b, m, d), torch.randn(b, d), torch.randn(b, d)
    for head in (ConcatFusion(d, m, True, True, 32, 0.0), CrossAttentionFusion(d, 2, m, True, True, 32, 0.0)):
        out = head.eval()(states, ctx, demo)
        assert out.shape == (b, d)
        assert torch.allclose(out.norm(dim=-1), torch.ones(b), atol=1e-5)
    seq_only = ConcatFusion(d, m, False, False, 32, 0.0)
    assert seq_only(states, None, None).shape == (b, d)
    demo_emb = DemographicsEmbedding(d, country_buckets=8, dropout=0.0)
    assert demo_emb(torch.tensor([0, 7]), torch.tensor([0, 7]), torch.tensor([0, 3])).shape == (2, d)
    items = ItemTower(d, 32, 0.0)(torch.randn(4, d), torch.randn(4, d))
    assert items.shape == (4, d) and torch.allclose(items.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_full_model_shapes(tiny_config, random_inputs):
    cfg = tiny_config(fusion="cross_attention", state_len=3)
    model = ContextualTwoTower(cfg).eval()
    x = random_inputs(cfg)
    assert model.encode_user_state(x[0], x[1]).shape == (6, 3 * cfg.dim)
    assert model(*x).shape == (6, cfg.dim)
    assert model.item_embeddings(torch.arange(4), x[2][:4], x[3][:4]).shape == (4, cfg.dim)
