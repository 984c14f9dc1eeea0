"""LAS through a 2-stage pipeline trains like one device, with cross-entropy and with MWER.

One spawned job runs every configuration for three steps on utterances of varying lengths.
For MWER each step first beam-searches N-best lists through the pipeline (all ranks
together), builds the (B, N+1, U) teacher-forcing batch, then runs the pipelined forward and
backward of `MWERLoss`; the reference does the same with the whole model in this process.
Losses, every parameter's gradient at every step, and the weights after 3 steps must match.
"""

from __future__ import annotations

import functools

import pytest
import torch

from giantpipe.models.beam_search import beam_search
from giantpipe.models.contract import build_materialized
from giantpipe.models.las import LAS
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.models.mwer import MWERLoss, nbest_batch
from giantpipe.platform.data.speech import SpeechCollator
from giantpipe.strategies.chunked_decoding import chunked_beam_search
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.pipelined_decoding import pipelined_beam_search
from giantpipe.strategies.topology import Topology
from pipeline_harness import spawn

SEED, LR, STEPS, BATCH, N_MELS = 7, 0.3, 3, 6, 5
PAD, BOS, EOS, VOCAB = 0, 1, 2, 9
MODEL = dict(vocab_size=VOCAB, n_mels=N_MELS, listener_hidden=4, listener_layers=2, pyramid_levels=1,
             speller_hidden=6, speller_layers=2, embedding_size=5, dropout=0.0, pad_id=PAD)
# layers: 0 listener 1 | 1 listener 2 (pyramid) | 2 speller embedding | 3 speller 1 + attention
#         | 4 speller 2 | 5 projection
SEARCH = dict(bos_id=BOS, eos_id=EOS, beam_size=3, n_best=3, alpha=0.6, beta=0.0, max_len=7,
              banned_ids=(PAD, BOS))


def words(ids) -> str:
    """Grapheme ids as text: id 3 is the space, so the hypotheses have words to count."""
    return "".join(" " if int(i) == 3 else chr(ord("a") + int(i)) for i in ids if int(i) > EOS)


def make_batches(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    collate = SpeechCollator(PAD, BOS, EOS)
    batches = []
    for step in range(STEPS):
        items = []
        for i in range(BATCH):
            frames = int(torch.randint(5, 12 + 3 * step, (), generator=gen))
            length = int(torch.randint(1, 6, (), generator=gen))
            items.append({"features": torch.randn(frames, N_MELS, generator=gen, dtype=torch.float64),
                          "tgt": torch.randint(3, VOCAB, (length,), generator=gen).tolist(), "index": i})
        batches.append(collate(items))
    return batches


def loss_for(kind: str):
    return MWERLoss(0.01, PAD) if kind == "mwer" else TokenCrossEntropy(0.1, ignore_index=PAD,
                                                                         target_key="tgt_out")


def with_nbest(batch: dict, search) -> dict:
    return nbest_batch(batch, search(batch), words, bos_id=BOS, eos_id=EOS, pad_id=PAD)


def run_configs(rank: int, world_size: int, configs: list[dict]) -> list[dict]:
    torch.set_default_dtype(torch.float64)
    results = []
    for cfg in configs:
        with torch.device("meta"):
            model = LAS(**MODEL)
        engine = PipelineEngine(model, loss_for(cfg["loss"]), cfg["balance"],
                                micro_batches=cfg["micro_batches"], topology=Topology(2, 1),
                                schedule=cfg["schedule"], checkpoint=cfg["checkpoint"], seed=SEED,
                                virtual_stages=cfg.get("virtual_stages", 1))
        opt = torch.optim.SGD(engine.parameters(), lr=LR)
        losses, grads, sizes = [], [], []
        for batch in make_batches():
            if cfg["loss"] == "mwer":
                search = pipelined_beam_search if engine.virtual_stages == 1 else chunked_beam_search
                batch = with_nbest(batch, functools.partial(search, engine, **SEARCH))
                sizes.append(tuple(batch["tgt_out"].shape))
            opt.zero_grad()
            losses.append(engine.train_step(batch).item())
            grads.append({n: p.grad.clone() for n, p in engine.named_parameters()})
            opt.step()
        weights = {n: p.detach().clone() for n, p in engine.named_parameters()}
        results.append({"losses": losses, "grads": grads, "weights": weights, "sizes": sizes})
    return results


def reference_training(kind: str) -> dict:
    torch.set_default_dtype(torch.float64)
    try:
        model = build_materialized(lambda: LAS(**MODEL), SEED)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        loss_fn = loss_for(kind)
        losses, grads, sizes = [], [], []

        def search(batch):
            encoded = model.encode(batch)
            with torch.no_grad():
                return beam_search(model.step_decoder(), encoded, encoded["src_len"], **SEARCH)

        for batch in make_batches():
            if kind == "mwer":
                batch = with_nbest(batch, search)
                sizes.append(tuple(batch["tgt_out"].shape))
            opt.zero_grad()
            loss = loss_fn(model(batch), batch) / loss_fn.normalizer(batch)
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        return {"losses": losses, "grads": grads, "sizes": sizes,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    finally:
        torch.set_default_dtype(torch.float32)


CONFIGS = [  # the listener alone on stage 0; the attention on stage 0 with its memory
    {"loss": "cross_entropy", "balance": [2, 4], "micro_batches": 2, "schedule": "gpipe", "checkpoint": "never"},
    {"loss": "cross_entropy", "balance": [4, 2], "micro_batches": 3, "schedule": "1f1b", "checkpoint": "always"},
    {"loss": "mwer", "balance": [2, 4], "micro_batches": 2, "schedule": "gpipe", "checkpoint": "except_last"},
    {"loss": "mwer", "balance": [3, 3], "micro_batches": 3, "schedule": "1f1b", "checkpoint": "always"},
    # zero-bubble schedules: zb_h1 with MWER's pipelined N-best lists; zbv's V (stage 0 holds
    # the listener's first layer and the projection) with cross-entropy
    {"loss": "mwer", "balance": [2, 4], "micro_batches": 2, "schedule": "zb_h1", "checkpoint": "never"},
    {"loss": "cross_entropy", "balance": [1, 2, 2, 1], "micro_batches": 3, "schedule": "zbv",
     "checkpoint": "except_last", "virtual_stages": 2},
    {"loss": "mwer", "balance": [2, 1, 2, 1], "micro_batches": 2, "schedule": "zbv",
     "checkpoint": "never", "virtual_stages": 2},  # N-best lists searched through the V
    {"loss": "mwer", "balance": [1, 2, 2, 1], "micro_batches": 4, "schedule": "dualpipev",
     "checkpoint": "always", "virtual_stages": 2},  # fused and split backwards in one step
]


@pytest.fixture(scope="module")
def job():
    return [list(r) for r in zip(*spawn(run_configs, 2, CONFIGS), strict=True)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_two_stage_las_trains_like_one_device(job, index):
    cfg, per_rank = CONFIGS[index], job[index]
    ref = reference_training(cfg["loss"])
    if cfg["loss"] == "mwer":  # real N-best lists: several hypotheses per utterance
        assert all(size[1] == SEARCH["n_best"] + 1 for size in ref["sizes"])
    seen = set()
    for stage, res in enumerate(per_rank):
        at = f"{cfg} stage {stage}"
        assert res["sizes"] == ref["sizes"], at  # the pipelined search found the same lists
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6), at
        for step, grads in enumerate(res["grads"]):
            for name, grad in grads.items():
                assert close(grad, ref["grads"][step][name]), f"{at}: grad of {name} at step {step}"
        for name, weight in res["weights"].items():
            assert close(weight, ref["weights"][name]), f"{at}: weight {name}"
            seen.add(name)
    assert seen == set(ref["weights"]), "some parameters were never compared"
