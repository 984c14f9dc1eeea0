"""GNMT risk training through a 2-stage pipeline trains like one device, for every risk and for
beam-search and sampled candidates.

One spawned job runs every configuration for three steps on sentences of varying lengths.
Each step first finds N candidates per sentence through the pipeline (all ranks together:
beam search, or keyed sampling), scores them with the risk on detokenized words, builds the
(B, N+1, T) teacher-forcing batch, then runs the pipelined forward and backward of `MWERLoss`;
the reference does the same with the whole model in this process. Losses, every parameter's
gradient at every step, and the weights after 3 steps must match (float64).
"""

from __future__ import annotations

import functools

import pytest
import torch

from giantpipe.models.beam_search import beam_search
from giantpipe.models.candidate_sampling import sample_candidates
from giantpipe.models.contract import build_materialized
from giantpipe.models.gnmt import GNMT
from giantpipe.models.keyed_dropout import sample_keys
from giantpipe.models.mwer import MWERLoss, nbest_batch
from giantpipe.models.risks import risk_named
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.pipelined_decoding import pipelined_beam_search, pipelined_sample
from giantpipe.strategies.topology import Topology
from pipeline_harness import spawn

SEED, LR, STEPS, BATCH = 3, 0.5, 3, 6
PAD, BOS, EOS, SRC_VOCAB, TGT_VOCAB = 0, 1, 2, 9, 8
MODEL = dict(src_vocab_size=SRC_VOCAB, tgt_vocab_size=TGT_VOCAB, hidden_size=4, num_encoder_layers=2,
             num_decoder_layers=3, dropout=0.0, pad_id=PAD, init_weight=0.5)
# layers: 0 src embedding | 1 encoder 1 (bi) | 2 encoder 2 | 3 tgt embedding
#         | 4 decoder 1 + attention | 5 decoder 2 | 6 decoder 3 | 7 projection
LENGTHS = dict(bos_id=BOS, eos_id=EOS, max_len=6, banned_ids=(PAD, BOS))
BEAM = dict(LENGTHS, beam_size=3, n_best=3, alpha=0.6, beta=0.1)


def words(ids) -> str:
    """Target ids as text, one word each from a 5-word vocabulary, so that n-grams match."""
    return " ".join(["one", "two", "three", "four", "five"][int(i) - 3] for i in ids if int(i) > EOS)


def make_batches(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(STEPS):
        src_len = torch.randint(2, 6 + step, (BATCH,), generator=gen)
        src = torch.randint(4, SRC_VOCAB, (BATCH, int(src_len.max())), generator=gen)
        src = src * (torch.arange(src.size(1)) < src_len.unsqueeze(1))
        tgt_len = torch.randint(1, 5, (BATCH,), generator=gen)
        tgt = torch.randint(3, TGT_VOCAB, (BATCH, int(tgt_len.max())), generator=gen)
        tgt = tgt * (torch.arange(tgt.size(1)) < tgt_len.unsqueeze(1))
        tgt_out = torch.cat([tgt, torch.zeros(BATCH, 1, dtype=torch.long)], 1)
        tgt_out[torch.arange(BATCH), tgt_len] = EOS
        tgt_in = torch.cat([torch.full((BATCH, 1), BOS), tgt], 1)
        batches.append({"src": src, "src_len": src_len, "tgt_in": tgt_in, "tgt_out": tgt_out,
                        "tgt_len": tgt_len + 1, "index": torch.arange(BATCH)})
    return batches


def candidates_kwargs(cfg: dict, step: int) -> dict:
    if cfg["candidates"] == "beam":
        return BEAM
    return dict(LENGTHS, samples=3, temperature=1.5, keys=sample_keys(SEED, step, 0, BATCH))


def with_candidates(batch: dict, cfg: dict, search) -> dict:
    return nbest_batch(batch, search(batch), words, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                       risk=risk_named(cfg["risk"]))


def run_configs(rank: int, world_size: int, configs: list[dict]) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    results = []
    for cfg in configs:
        with torch.device("meta"):
            model = GNMT(**MODEL)
        engine = PipelineEngine(model, MWERLoss(0.017, PAD), cfg["balance"],
                                micro_batches=cfg["micro_batches"], topology=Topology(2, 1),
                                schedule=cfg["schedule"], checkpoint=cfg["checkpoint"], seed=SEED)
        search_fn = pipelined_beam_search if cfg["candidates"] == "beam" else pipelined_sample
        opt = torch.optim.SGD(engine.parameters(), lr=LR)
        record = {"losses": [], "grads": [], "risks": []}
        for step, batch in enumerate(make_batches()):
            search = functools.partial(search_fn, engine, **candidates_kwargs(cfg, step))
            batch = with_candidates(batch, cfg, search)
            record["risks"].append(batch["nbest_errors"])
            opt.zero_grad()
            record["losses"].append(engine.train_step(batch).item())
            record["grads"].append({n: p.grad.clone() for n, p in engine.named_parameters()})
            opt.step()
        record["weights"] = {n: p.detach().clone() for n, p in engine.named_parameters()}
        results.append(record)
    return results


def reference_training(cfg: dict) -> dict:
    torch.set_default_dtype(torch.float64)
    try:
        model = build_materialized(lambda: GNMT(**MODEL), SEED)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = MWERLoss(0.017, PAD)
        record = {"losses": [], "grads": [], "risks": []}
        for step, batch in enumerate(make_batches()):
            def search(batch, step=step):
                encoded = model.encode(batch)
                fn = beam_search if cfg["candidates"] == "beam" else sample_candidates
                return fn(model.step_decoder(), encoded, encoded["src_len"],
                          **candidates_kwargs(cfg, step))

            batch = with_candidates(batch, cfg, search)
            record["risks"].append(batch["nbest_errors"])
            opt.zero_grad()
            loss = loss_fn(model(batch), batch) / loss_fn.normalizer(batch)
            loss.backward()
            record["losses"].append(loss.item())
            record["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        record["weights"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return record
    finally:
        torch.set_default_dtype(torch.float32)


CONFIGS = [  # cuts: encoder | decoder, inside the decoder (attention on stage 0), inside the encoder
    {"risk": "word_errors", "candidates": "beam", "balance": [4, 4], "micro_batches": 2,
     "schedule": "gpipe", "checkpoint": "except_last"},
    {"risk": "char_errors", "candidates": "beam", "balance": [5, 3], "micro_batches": 3,
     "schedule": "1f1b", "checkpoint": "always"},
    {"risk": "gleu", "candidates": "beam", "balance": [2, 6], "micro_batches": 2,
     "schedule": "1f1b", "checkpoint": "never"},
    {"risk": "sentence_bleu", "candidates": "beam", "balance": [6, 2], "micro_batches": 3,
     "schedule": "gpipe", "checkpoint": "always"},
    {"risk": "chrf", "candidates": "beam", "balance": [4, 4], "micro_batches": 3,
     "schedule": "1f1b", "checkpoint": "except_last"},
    {"risk": "gleu", "candidates": "sample", "balance": [5, 3], "micro_batches": 2,
     "schedule": "gpipe", "checkpoint": "except_last"},
    {"risk": "word_errors", "candidates": "sample", "balance": [3, 5], "micro_batches": 3,
     "schedule": "1f1b", "checkpoint": "always"},
]


@pytest.fixture(scope="module")
def job():
    return [list(r) for r in zip(*spawn(run_configs, 2, CONFIGS, join_timeout=300), strict=True)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_two_stage_gnmt_risk_training_equals_one_device(job, index):
    cfg, per_rank = CONFIGS[index], job[index]
    ref = reference_training(cfg)
    # real candidate lists with risks that differ: the loss is not the CE term alone
    assert all(r.size(1) == 3 for r in ref["risks"]) and torch.cat(ref["risks"]).std() > 0, cfg
    seen = set()
    for stage, res in enumerate(per_rank):
        at = f"{cfg} stage {stage}"
        for got, expected in zip(res["risks"], ref["risks"], strict=True):
            assert torch.equal(got, expected), at  # the pipeline found the same candidates
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6), at
        for step, grads in enumerate(res["grads"]):
            for name, grad in grads.items():
                assert close(grad, ref["grads"][step][name]), f"{at}: grad of {name} at step {step}"
        for name, weight in res["weights"].items():
            assert close(weight, ref["weights"][name]), f"{at}: weight {name}"
            seen.add(name)
    assert seen == set(ref["weights"]), "some parameters were never compared"
