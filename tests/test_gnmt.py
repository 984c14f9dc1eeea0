"""GNMT as composite layers: bidirectional first layer, residuals from layer 3, attention,
stepwise decoding equal to the full decoder, any contiguous split equal to the whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from giantpipe.models.attention import ATTENTION_KINDS, Attention
from giantpipe.models.contract import build_materialized, materialize
from giantpipe.models.gnmt import GNMT, trim_padding

torch.set_num_threads(1)
SRC_V, TGT_V, PAD = 17, 19, 0


def tiny(attention="normalized_bahdanau", enc=4, dec=4, seed=0, **kw) -> GNMT:
    model = build_materialized(
        lambda: GNMT(SRC_V, TGT_V, hidden_size=8, num_encoder_layers=enc, num_decoder_layers=dec,
                     embedding_size=6, dropout=0.0, attention=attention, pad_id=PAD, **kw),
        seed=seed,
    )
    return model.eval()


def make_batch(src_lens=(5, 3, 4), tgt_lens=(4, 2, 3), seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, s, t = len(src_lens), max(src_lens), max(tgt_lens)
    src = torch.randint(4, SRC_V, (b, s), generator=g)
    tgt = torch.randint(4, TGT_V, (b, t), generator=g)
    for i, (ls, lt) in enumerate(zip(src_lens, tgt_lens)):
        src[i, ls:] = PAD
        tgt[i, lt:] = PAD
    tgt_in = torch.cat([torch.ones(b, 1, dtype=torch.long), tgt[:, :-1]], dim=1)
    tgt_in[tgt == PAD] = PAD
    return {"src": src, "src_len": torch.tensor(src_lens), "tgt_in": tgt_in, "tgt_out": tgt,
            "tgt_len": torch.tensor(tgt_lens)}


def test_first_encoder_layer_is_bidirectional_and_ignores_padding():
    model, batch = tiny(), make_batch()
    first_two = range(0, 2)  # src embedding, encoder 1
    out = model.run_layers(model.first_carry(batch), first_two)["x"]  # (B, S, 2H)
    assert out.shape == (3, 5, 16)

    later = {**batch, "src": batch["src"].clone()}
    later["src"][0, 3] = (later["src"][0, 3] - 4 + 1) % (SRC_V - 4) + 4  # another real token
    out_later = model.run_layers(model.first_carry(later), first_two)["x"]
    h = 8
    # position 1 sees position 3 through the backward LSTM only
    assert torch.equal(out[0, 1, :h], out_later[0, 1, :h])
    assert not torch.allclose(out[0, 1, h:], out_later[0, 1, h:])

    padded = {**batch, "src": batch["src"].clone()}
    padded["src"][1, 4] = 7  # sentence 1 has 3 real tokens: position 4 is padding
    assert torch.equal(model.run_layers(model.first_carry(padded), first_two)["x"], out)
    assert torch.equal(model(padded)["logits"], model(batch)["logits"])
    assert torch.all(out[1, 3:] == 0)


@pytest.mark.parametrize("enc,dec", [(4, 4), (3, 5)])
def test_residual_connections_start_at_layer_three(enc, dec):
    model = tiny(enc=enc, dec=dec)
    enc_layers = [model.layers[i] for i in model.encoder_indices[1:]]
    dec_layers = [model.layers[i] for i in model.decoder_indices[1:-1]]
    assert [layer.residual for layer in enc_layers] == [k >= 3 for k in range(1, enc + 1)]
    assert [layer.residual for layer in dec_layers] == [k >= 3 for k in range(1, dec + 1)]

    # numerically: with all LSTM weights zero, h = 0, so a layer returns its input iff residual
    with torch.no_grad():
        for layer in enc_layers + dec_layers:
            for p in layer.lstm.parameters():
                p.zero_()
    batch = make_batch()
    carry = model.first_carry(batch)
    for i in range(len(model.layers) - 1):
        layer = model.layers[i]
        nxt = layer(carry)
        if i in model.encoder_indices[2:]:
            x_in, x_out = carry["x"], nxt.get("x", nxt.get("memory"))
            assert torch.equal(x_out, x_in) if layer.residual else torch.all(x_out == 0)
        if i in model.decoder_indices[2:-1]:
            assert torch.equal(nxt["y"], carry["y"]) if layer.residual else torch.all(nxt["y"] == 0)
        carry = nxt


def test_carry_keys_per_layer():
    model, batch = tiny(enc=3, dec=3), make_batch()
    carry, keys = model.first_carry(batch), []
    for layer in model.layers:
        carry = layer(carry)
        keys.append(sorted(carry))
    enc_keys = ["src_len", "src_mask", "tgt_in", "x"]
    assert keys == [
        enc_keys, enc_keys, enc_keys, ["memory", "src_len", "src_mask", "tgt_in"],
        ["memory", "src_len", "src_mask", "y"], ["context", "y"], ["context", "y"],
        ["context", "y"], ["logits"],
    ]
    assert model.layer_names[1] == "encoder_1_bi" and model.layer_names[-1] == "projection"


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_stepwise_decode_equals_full_decoder(attention):
    model, batch = tiny(attention), make_batch()
    full = F.log_softmax(model(batch)["logits"], dim=-1)
    encoded = model.encode(batch)
    decoder = model.step_decoder()
    beam = 2  # every sentence repeated: both rows must match the full decoder
    state = decoder.init_state(encoded, beam)
    steps = []
    for t in range(batch["tgt_in"].size(1)):
        log_probs, attn, state = decoder.step(batch["tgt_in"][:, t].repeat_interleave(beam), state)
        assert attn.shape == (3 * beam, 5)
        steps.append(log_probs)
    stepped = torch.stack(steps, 1).view(3, beam, *full.shape[1:])
    for k in range(beam):
        assert torch.allclose(stepped[:, k], full, atol=1e-5)


def test_stage_by_stage_stepping_equals_whole_decoder():
    """A decoder spread over stages: each stage steps its own layers, the step carry travels."""
    model, batch = tiny(), make_batch()
    encoded = model.encode(batch)
    dec = list(model.decoder_indices)
    stages = [dec[:2], dec[2:4], dec[4:]]
    states = [model.init_step_states(encoded, 1, s) for s in stages]
    whole = model.init_step_states(encoded, 1)
    for t in range(batch["tgt_in"].size(1)):
        carry = {"tgt_in": batch["tgt_in"][:, t:t + 1]}
        for j, s in enumerate(stages):
            carry, states[j] = model.step_layers(carry, states[j], s)
        ref, whole = model.step_layers({"tgt_in": batch["tgt_in"][:, t:t + 1]}, whole)
        assert torch.equal(carry["logits"], ref["logits"])
    assert set(carry) == {"logits", "attn"}


def test_any_contiguous_split_equals_the_layer_list():
    model, batch = tiny(), make_batch()
    whole = model(batch)["logits"]
    n = len(model.layers)
    for cut in range(1, n):
        first = model.first_carry(batch)
        snapshot = dict(first)
        mid = model.run_layers(first, range(0, cut))
        assert first.keys() == snapshot.keys()  # layers never mutate the carry they receive
        assert torch.equal(model.run_layers(mid, range(cut, n))["logits"], whole)
    for a, b in [(2, 6), (3, 9), (1, 5)]:
        carry = model.first_carry(batch)
        for part in (range(0, a), range(a, b), range(b, n)):
            carry = model.run_layers(carry, part)
        assert torch.equal(carry["logits"], whole)


def test_split_trims_micro_batches_and_keeps_the_loss():
    model, batch = tiny(), make_batch(src_lens=(5, 2, 2, 4), tgt_lens=(2, 1, 4, 4))
    parts = model.split(batch, 2)
    assert [p["src"].shape[1] for p in parts] == [5, 4]
    assert [p["tgt_in"].shape[1] for p in parts] == [2, 4]

    def loss_sum(b):
        logits = model(b)["logits"]
        return F.cross_entropy(logits.reshape(-1, TGT_V), b["tgt_out"].reshape(-1),
                               ignore_index=PAD, reduction="sum")

    assert torch.allclose(sum(loss_sum(p) for p in parts), loss_sum(batch), atol=1e-5)
    no_len = {k: v for k, v in batch.items() if k != "tgt_len"}  # tgt_len derived from tgt_out
    assert trim_padding(no_len, PAD)["tgt_out"].shape[1] == 4


def test_meta_build_materializes_per_layer_seeded():
    a, b = tiny(seed=3), tiny(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with torch.device("meta"):
        partial = GNMT(SRC_V, TGT_V, hidden_size=8, num_encoder_layers=4, num_decoder_layers=4,
                       embedding_size=6, dropout=0.0)
    materialize(partial, [2, 7], "cpu", seed=3)
    for i, layer in enumerate(partial.layers):
        params = list(layer.parameters())
        if i in (2, 7):
            for p, q in zip(params, a.layers[i].parameters()):
                assert torch.equal(p, q)
        else:
            assert all(p.is_meta for p in params)
    assert not torch.equal(tiny(seed=4).layers[2].lstm.weight_hh_l0, a.layers[2].lstm.weight_hh_l0)


def test_gradients_reach_every_parameter():
    model = tiny().train()
    out = model(make_batch())
    out["logits"].sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least one encoder"):
        GNMT(10, 10, num_encoder_layers=0)
    with pytest.raises(ValueError, match="attention kind"):
        GNMT(10, 10, hidden_size=4, attention="luong")


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_attention_masks_padding_and_normalizes(kind):
    torch.manual_seed(0)
    att = Attention(4, 6, kind=kind)
    query, memory = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    context, weights = att(query, att.project_keys(memory), memory, mask)
    assert context.shape == (2, 3, 6) and weights.shape == (2, 3, 5)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3))
    assert torch.all(weights[1, :, 2:] == 0)
    changed = memory.clone()
    changed[1, 2:] = 100.0  # padded memory never reaches the context
    assert torch.allclose(att(query, att.project_keys(changed), changed, mask)[0][1], context[1])


def test_normalized_bahdanau_uses_only_the_direction_of_v():
    torch.manual_seed(0)
    att = Attention(4, 6, kind="normalized_bahdanau")
    query, memory = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    keys = att.project_keys(memory)
    before = att.scores(query, keys)
    with torch.no_grad():
        att.v.mul_(7.0)
    assert torch.allclose(att.scores(query, keys), before, atol=1e-6)
    with torch.no_grad():
        att.g.mul_(2.0)
    assert torch.allclose(att.scores(query, keys), 2 * before, atol=1e-6)
