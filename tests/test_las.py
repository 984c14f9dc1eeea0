"""LAS as composite layers: the pyramid halves time, stepwise decoding equals teacher forcing,
any contiguous split equals the whole, N-best targets share one listener pass, beam search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from giantpipe.models.beam_search import beam_search
from giantpipe.models.contract import build_materialized, materialize
from giantpipe.models.las import LAS, pyramid_reduce, stack_frames, trim_speech_padding

torch.set_num_threads(1)
V, PAD, BOS, EOS, MELS = 12, 0, 1, 2, 8


def tiny(seed=0, listener_layers=4, pyramid_levels=3, speller_layers=3, **kw) -> LAS:
    model = build_materialized(
        lambda: LAS(V, n_mels=MELS, listener_hidden=6, listener_layers=listener_layers,
                    pyramid_levels=pyramid_levels, speller_hidden=8,
                    speller_layers=speller_layers, embedding_size=5, dropout=0.0, **kw),
        seed=seed,
    )
    return model.eval()


def make_batch(frames=(13, 8, 5), tgt_lens=(4, 2, 3), seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t, u = len(frames), max(frames), max(tgt_lens)
    features = torch.randn(b, t, MELS, generator=g)
    tgt = torch.randint(3, V, (b, u), generator=g)
    tgt_in = torch.full((b, u + 1), PAD)
    tgt_out = torch.full((b, u + 1), PAD)
    for i, (n, m) in enumerate(zip(frames, tgt_lens)):
        features[i, n:] = 0.0
        tgt_in[i, :m + 1] = torch.cat([torch.tensor([BOS]), tgt[i, :m]])
        tgt_out[i, :m + 1] = torch.cat([tgt[i, :m], torch.tensor([EOS])])
    return {"features": features, "feat_len": torch.tensor(frames), "tgt_in": tgt_in,
            "tgt_out": tgt_out, "tgt_len": torch.tensor(tgt_lens) + 1}


def test_pyramid_reduce_concatenates_adjacent_frames():
    x = torch.arange(2 * 5 * 2, dtype=torch.float).view(2, 5, 2) + 1
    out, lengths = pyramid_reduce(x, torch.tensor([5, 3]))
    assert out.shape == (2, 3, 4) and lengths.tolist() == [3, 2]
    assert torch.equal(out[0, 0], torch.cat([x[0, 0], x[0, 1]]))
    assert torch.equal(out[0, 2], torch.cat([x[0, 4], torch.zeros(2)]))  # odd T: zero frame
    assert torch.equal(out[1, 1], torch.cat([x[1, 2], torch.zeros(2)]))  # past length: zeroed


def test_listener_halves_time_per_pyramid_level_and_masks_follow():
    model, batch = tiny(), make_batch()
    carry = model.first_carry(batch)
    times, lengths = [], []
    for i in model.encoder_indices:
        carry = model.layers[i](carry)
        out = carry.get("x", carry.get("memory"))
        times.append(out.size(1))
        lengths.append(carry["src_len"].tolist())
    assert times == [13, 7, 4, 2]
    assert lengths == [[13, 8, 5], [7, 4, 3], [4, 2, 2], [2, 1, 1]]
    assert carry["src_mask"].tolist() == [[True, True], [True, False], [True, False]]
    assert torch.all(carry["memory"][1:, 1:] == 0)  # padded listener states are zero
    assert model.reduction == 8 and model.layer_names[:4] == [
        "listener_1", "listener_2_pyramid", "listener_3_pyramid", "listener_4_pyramid"]

    # an utterance's memory does not depend on the padding of the batch around it
    alone = model.encode({"features": batch["features"][2:, :5], "feat_len": batch["feat_len"][2:]})
    assert torch.allclose(alone["memory"][0], model.encode(batch)["memory"][2, :1], atol=1e-6)


def test_carry_keys_per_layer():
    model, batch = tiny(speller_layers=2), make_batch()
    carry, keys = model.first_carry(batch), []
    for layer in model.layers:
        carry = layer(carry)
        keys.append(sorted(carry))
    listener = ["src_len", "tgt_in", "x"]
    assert keys == [
        listener, listener, listener, ["memory", "src_len", "src_mask", "tgt_in"],
        ["memory", "src_len", "src_mask", "y"], ["context", "y"], ["context", "y"], ["logits"],
    ]
    assert carry["logits"].shape == (3, 5, V)


def test_stepwise_decode_equals_teacher_forced_speller():
    model, batch = tiny(), make_batch()
    full = F.log_softmax(model(batch)["logits"], dim=-1)
    encoded = model.encode(batch)
    decoder, beam = model.step_decoder(), 2  # every utterance repeated: both rows must match
    state = decoder.init_state(encoded, beam)
    steps = []
    for t in range(batch["tgt_in"].size(1)):
        log_probs, attn, state = decoder.step(batch["tgt_in"][:, t].repeat_interleave(beam), state)
        assert attn.shape == (3 * beam, 2)
        steps.append(log_probs)
    stepped = torch.stack(steps, 1).view(3, beam, *full.shape[1:])
    for k in range(beam):
        assert torch.allclose(stepped[:, k], full, atol=1e-5)


def test_stage_by_stage_stepping_equals_whole_speller():
    model, batch = tiny(), make_batch()
    encoded = model.encode(batch)
    dec = list(model.decoder_indices)  # embedding, speller 1..3, projection
    stages = [dec[:2], dec[2:3], dec[3:]]
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
    for a, b in [(2, 5), (4, 6), (1, 8)]:
        carry = model.first_carry(batch)
        for part in (range(0, a), range(a, b), range(b, n)):
            carry = model.run_layers(carry, part)
        assert torch.equal(carry["logits"], whole)


def test_split_trims_micro_batches_and_keeps_the_loss():
    model = tiny()
    batch = make_batch(frames=(13, 6, 5, 9), tgt_lens=(2, 1, 4, 4))
    parts = model.split(batch, 2)
    assert [p["features"].shape[1] for p in parts] == [13, 9]
    assert [p["tgt_in"].shape[1] for p in parts] == [3, 5]

    def loss_sum(b):
        logits = model(b)["logits"]
        return F.cross_entropy(logits.reshape(-1, V), b["tgt_out"].reshape(-1),
                               ignore_index=PAD, reduction="sum")

    assert torch.allclose(sum(loss_sum(p) for p in parts), loss_sum(batch), atol=1e-5)
    three_d = {**batch, "tgt_out": batch["tgt_out"].unsqueeze(1).repeat(1, 2, 1)}
    assert trim_speech_padding(three_d, PAD)["tgt_out"].shape == (4, 2, 5)


def test_several_targets_per_utterance_share_one_listener_pass():
    """(B, R, U) targets (MWER's N-best rows) give the logits of R separate forwards."""
    model = tiny()
    a, b = make_batch(seed=0), make_batch(seed=1)
    stacked = {**a, "tgt_in": torch.stack([a["tgt_in"], b["tgt_in"]], dim=1)}
    logits = model(stacked)["logits"]  # (B*R, U, V), utterance-major
    assert logits.shape == (6, 5, V)
    assert torch.allclose(logits[0::2], model(a)["logits"], atol=1e-6)
    assert torch.allclose(logits[1::2], model({**a, "tgt_in": b["tgt_in"]})["logits"], atol=1e-6)


def test_beam_search_returns_nbest_lists_sorted_by_score():
    model, batch = tiny(seed=2), make_batch()
    encoded = model.encode(batch)
    result = beam_search(model.step_decoder(), encoded, encoded["src_len"], bos_id=BOS,
                         eos_id=EOS, beam_size=4, n_best=4, max_len=6, banned_ids=(PAD, BOS))
    assert len(result.hypotheses) == 3
    for hyps in result.hypotheses:
        assert 1 <= len(hyps) <= 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert all(PAD not in h.tokens and BOS not in h.tokens and len(h.tokens) < 6
                   for h in hyps)
    assert any(len(h) == 4 for h in result.hypotheses)
    greedy = beam_search(model.step_decoder(), encoded, encoded["src_len"], bos_id=BOS,
                         eos_id=EOS, beam_size=1, max_len=6, banned_ids=(PAD, BOS))
    assert len(greedy.best()) == 3


def test_meta_build_materializes_per_layer_seeded():
    a = tiny(seed=3)
    with torch.device("meta"):
        partial = LAS(V, n_mels=MELS, listener_hidden=6, listener_layers=4, pyramid_levels=3,
                      speller_hidden=8, speller_layers=3, embedding_size=5, dropout=0.0)
    materialize(partial, [1, 5], "cpu", seed=3)
    for i, layer in enumerate(partial.layers):
        params = list(layer.parameters())
        if i in (1, 5):
            assert all(torch.equal(p, q) for p, q in zip(params, a.layers[i].parameters()))
        else:
            assert all(p.is_meta for p in params)
    partial.eval()
    carry = partial.run_layers(partial.first_carry(make_batch()), [])
    assert torch.equal(partial.layers[1](a.layers[0](carry))["x"],
                       a.run_layers(carry, [0, 1])["x"])


def test_gradients_reach_every_parameter():
    model = tiny().train()
    model(make_batch())["logits"].sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least one listener"):
        LAS(10, listener_layers=0)
    with pytest.raises(ValueError, match="pyramid_levels"):
        LAS(10, listener_layers=3, pyramid_levels=3)
    with pytest.raises(ValueError, match="dropout"):
        LAS(10, dropout=1.0)


def test_frame_stacking_divides_time_before_the_first_listener_layer():
    x = torch.arange(2 * 7 * 2, dtype=torch.float32).reshape(2, 7, 2)
    out, lengths = stack_frames(x, torch.tensor([7, 4]), 3)
    assert out.shape == (2, 3, 6) and lengths.tolist() == [3, 2]
    assert out[0, 2].tolist() == [12.0, 13.0, 0.0, 0.0, 0.0, 0.0]  # 7th frame, then zeros
    assert out[1, 1].tolist() == [20.0, 21.0, 0.0, 0.0, 0.0, 0.0]  # frames past length 4 zeroed
    model = build_materialized(lambda: LAS(10, n_mels=2, listener_hidden=3, listener_layers=2,
                                           pyramid_levels=1, speller_hidden=4, frame_stack=3), 0)
    assert model.reduction == 6
    encoded = model.encode({"features": torch.randn(2, 13, 2), "feat_len": torch.tensor([13, 6])})
    assert encoded["memory"].shape[1] == 3 and encoded["src_len"].tolist() == [3, 1]
