"""The giant net honours the composite-layer contract."""

import torch

from giantpipe.models.contract import build_materialized, materialize
from giantpipe.models.giant_net import GiantNet


def factory():
    return GiantNet(vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_len=12, dropout=0.0)


def test_layer_list_is_embedding_blocks_head():
    model = factory()
    assert len(model.layers) == 5
    assert [type(m).__name__ for m in model.layers] == ["TokenEmbedding"] + ["TransformerBlock"] * 3 + ["LMHead"]


def test_layer_init_depends_only_on_seed_and_index():
    full = build_materialized(factory, seed=3)
    with torch.device("meta"):
        partial = factory()
    materialize(partial, [2, 3], "cpu", seed=3)
    for i in (2, 3):
        for a, b in zip(full.layers[i].parameters(), partial.layers[i].parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.is_meta for p in partial.layers[0].parameters())
    other_seed = build_materialized(factory, seed=4)
    assert not torch.equal(full.layers[1].qkv.weight, other_seed.layers[1].qkv.weight)


def test_any_contiguous_cut_gives_the_same_logits():
    model = build_materialized(factory, seed=0).eval()
    batch = {"tokens": torch.randint(0, 50, (2, 10))}
    whole = model(batch)["logits"]
    for cut in range(1, len(model.layers)):
        carry = model.run_layers(model.first_carry(batch), range(cut))
        out = model.run_layers(carry, range(cut, len(model.layers)))["logits"]
        torch.testing.assert_close(out, whole)


def test_attention_is_causal():
    model = build_materialized(factory, seed=0).eval()
    tokens = torch.randint(0, 50, (1, 10))
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 50
    a, b = model({"tokens": tokens})["logits"], model({"tokens": changed})["logits"]
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])
