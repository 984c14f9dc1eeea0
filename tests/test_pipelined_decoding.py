"""GNMT through the pipeline: training equals one device, and so does beam search.

One spawned job per world size (process start-up dominates) trains every configuration for
three steps on batches whose source and target lengths vary, then decodes through the same
pipeline. The reference trains the whole model in this process; beam search is checked
against one device holding the pipeline's own final weights, so the two searches see
bit-identical models and must agree exactly.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from giantpipe.models.beam_search import beam_search
from giantpipe.models.contract import build_materialized
from giantpipe.models.gnmt import GNMT
from giantpipe.models.losses import TokenCrossEntropy
from giantpipe.platform.data.translation import TranslationCollator
from giantpipe.strategies.chunked_decoding import chunked_beam_search
from giantpipe.strategies.engine import PipelineEngine
from giantpipe.strategies.pipelined_decoding import pipelined_beam_search
from giantpipe.strategies.topology import Topology
from pipeline_harness import spawn

SEED, LR, STEPS, BATCH = 5, 0.5, 3, 8
PAD, BOS, EOS, VOCAB = 0, 1, 2, 23
MODEL = dict(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, hidden_size=8, num_encoder_layers=2,
             num_decoder_layers=3, embedding_size=6, dropout=0.0, pad_id=PAD)
# layers: 0 src emb | 1 enc 1 (bi) | 2 enc 2 | 3 tgt emb | 4 dec 1 + attention | 5 dec 2 | 6 dec 3 | 7 projection
SEARCH = dict(bos_id=BOS, eos_id=EOS, beam_size=3, alpha=0.6, beta=0.2, max_len=9, max_len_a=1.5,
              max_len_b=2, n_best=2, banned_ids=(PAD, BOS))


def make_model() -> GNMT:
    return GNMT(**MODEL)


def loss_fn() -> TokenCrossEntropy:
    return TokenCrossEntropy(label_smoothing=0.1, ignore_index=PAD, target_key="tgt_out")


def make_batches(steps: int = STEPS, size: int = BATCH, seed: int = 0) -> list[dict]:
    """Padded batches whose longest source and target differ every step (and within one)."""
    gen = torch.Generator().manual_seed(seed)
    collate = TranslationCollator(PAD, BOS, EOS)

    def sentence(n):
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    batches = []
    for step in range(steps):
        longest = 4 + 2 * step
        items = [{"src": sentence(int(torch.randint(1, longest + 1, (), generator=gen))),
                  "tgt": sentence(int(torch.randint(1, longest, (), generator=gen))), "index": i}
                 for i in range(size)]
        batches.append(collate(items))
    return batches


def perturb_for_search(model: GNMT) -> None:
    """Seeded noise on every local weight (by name, so any stage layout gets the same model) and
    a lower EOS logit: the barely trained model then ends hypotheses at various steps, some early
    (with a coverage penalty), some at their length limit."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_meta:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p += 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        projection = model.layers[-1].linear
        if not projection.bias.is_meta:
            projection.bias[EOS] -= 0.8


def config(balance, micro_batches=2, schedule="gpipe", checkpoint="except_last", replicas=1, virtual_stages=1):
    return {"balance": balance, "micro_batches": micro_batches, "schedule": schedule,
            "checkpoint": checkpoint, "replicas": replicas, "virtual_stages": virtual_stages}


def run_configs(rank: int, world_size: int, configs: list[dict]) -> list[dict]:
    """Worker: train each configuration, then beam-search the first batch through the pipeline."""
    torch.set_default_dtype(torch.float64)
    results = []
    for cfg in configs:
        with torch.device("meta"):
            model = make_model()
        chunks = cfg["virtual_stages"]
        topology = Topology(len(cfg["balance"]) // chunks, cfg["replicas"])
        engine = PipelineEngine(model, loss_fn(), cfg["balance"], micro_batches=cfg["micro_batches"],
                                topology=topology, schedule=cfg["schedule"],
                                checkpoint=cfg["checkpoint"], seed=SEED, virtual_stages=chunks)
        batches = [share(b, engine.replica, cfg["replicas"]) for b in make_batches()]
        opt = torch.optim.SGD(engine.parameters(), lr=LR)
        losses, grads = [], []
        for batch in batches:
            opt.zero_grad()
            losses.append(engine.train_step(batch).item())
            grads.append({n: p.grad.clone() for n, p in engine.named_parameters()})
            opt.step()
        weights = {n: p.detach().clone() for n, p in engine.named_parameters()}
        perturb_for_search(engine.module)
        engine.module.eval()
        search = pipelined_beam_search if chunks == 1 else chunked_beam_search  # V chunks a stage
        hypotheses = search(engine, make_batches(3, seed=9)[-1], **SEARCH).hypotheses
        results.append({"losses": losses, "grads": grads, "weights": weights, "stage": engine.stage,
                        "replica": engine.replica, "hypotheses": hypotheses})
    return results


def share(batch: dict, replica: int, replicas: int) -> dict:
    return {k: torch.tensor_split(v, replicas)[replica] for k, v in batch.items()}


def reference_training() -> dict:
    """Plain SGD on whole batches with the whole model in this process."""
    torch.set_default_dtype(torch.float64)
    try:
        model = build_materialized(make_model, SEED)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        losses, grads = [], []
        for batch in make_batches():
            opt.zero_grad()
            loss = loss_fn()(model(batch), batch) / loss_fn().normalizer(batch)
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        return {"losses": losses, "grads": grads,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
    finally:
        torch.set_default_dtype(torch.float32)


def one_device_search(weights: dict):
    """Beam search on one device holding exactly the pipeline's final weights."""
    torch.set_default_dtype(torch.float64)
    try:
        model = build_materialized(make_model, SEED)
        model.load_state_dict(weights)
        perturb_for_search(model)
        model.eval()
        batch = make_batches(3, seed=9)[-1]
        return beam_search(model.step_decoder(), model.encode(batch), batch["src_len"], **SEARCH)
    finally:
        torch.set_default_dtype(torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float64 model; the float32 loss and the micro-batch summation order differ slightly
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def assert_matches_one_device(cfg: dict, per_rank: list[dict], ref: dict) -> None:
    where = f"balance={cfg['balance']} M={cfg['micro_batches']} {cfg['schedule']}/{cfg['checkpoint']}"
    seen = set()
    for res in per_rank:
        at = f"{where} stage {res['stage']} replica {res['replica']}"
        assert res["losses"] == pytest.approx(ref["losses"], rel=1e-6), at
        for step, grads in enumerate(res["grads"]):
            for name, grad in grads.items():
                assert close(grad, ref["grads"][step][name]), f"{at}: grad of {name} at step {step}"
        for name, weight in res["weights"].items():
            assert close(weight, ref["weights"][name]), f"{at}: weight {name}"
            seen.add(name)
    assert seen == set(ref["weights"]), "some parameters were never compared"


def assert_same_search(cfg: dict, per_rank: list[dict]) -> None:
    """Every rank's hypotheses and scores equal one device's with the same weights."""
    replica0 = [r for r in per_rank if r["replica"] == 0]
    weights = {n: w for r in replica0 for n, w in r["weights"].items()}
    expected = one_device_search(weights).hypotheses
    lengths = {len(h.tokens) for hs in expected for h in hs}
    assert len(lengths) >= 3 and any(h.coverage_penalty < 0 for hs in expected for h in hs)
    for res in per_rank:
        got = res["hypotheses"]  # every replica decoded the whole batch
        at = f"balance={cfg['balance']} replicas={cfg['replicas']} stage {res['stage']}"
        assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in expected], at
        for hs, es in zip(got, expected):
            for h, e in zip(hs, es):
                assert h.score == pytest.approx(e.score, rel=1e-12, abs=1e-12), at
                assert h.log_prob == pytest.approx(e.log_prob, rel=1e-12, abs=1e-12), at
                assert h.coverage_penalty == pytest.approx(e.coverage_penalty, rel=1e-12, abs=1e-12), at


# cuts: the encoder alone on stage 0; the target embedding on stage 0 but the attention on
# stage 1; the attention on stage 0; only the projection on stage 1
TWO_STAGES = [
    config([3, 5], micro_batches=1, checkpoint="never"),
    config([4, 4], micro_batches=2, schedule="1f1b", checkpoint="always"),
    config([5, 3], micro_batches=4),
    config([7, 1], micro_batches=8, schedule="1f1b"),
    # zero-bubble: W deferred in every linear layer (attention, projection); the LSTMs keep
    # theirs in B. zbv: stage 0 holds the source side and the projection, stage 1 the middle
    config([4, 4], micro_batches=4, schedule="zb_h1", checkpoint="never"),
    config([2, 2, 2, 2], micro_batches=4, schedule="zbv", checkpoint="except_last", virtual_stages=2),
    # dualpipev: the same V, stage 0 also holds the first decoder layer's input (a 2-3-2-1 cut)
    config([2, 3, 2, 1], micro_batches=4, schedule="dualpipev", checkpoint="never", virtual_stages=2),
]
# four stages: the encoder output passes through stage 1 (encoder 2 + target embedding) on
# its way to the attention on stage 2; and a 2-stage pipeline in 2 data-parallel replicas
FOUR_PROCESSES = [
    config([2, 2, 2, 2], micro_batches=4),
    config([1, 3, 3, 1], micro_batches=2, schedule="1f1b", checkpoint="always"),
    config([4, 4], micro_batches=2, replicas=2),
]


@pytest.fixture(scope="module")
def reference():
    return reference_training()


@pytest.fixture(scope="module")
def two_stage_job():
    return [list(r) for r in zip(*spawn(run_configs, 2, TWO_STAGES), strict=True)]


@pytest.fixture(scope="module")
def four_process_job():
    return [list(r) for r in zip(*spawn(run_configs, 4, FOUR_PROCESSES), strict=True)]


def test_two_stage_gnmt_trains_like_one_device(two_stage_job, reference):
    for cfg, per_rank in zip(TWO_STAGES, two_stage_job):
        assert_matches_one_device(cfg, per_rank, reference)


def test_four_stage_and_replicated_gnmt_train_like_one_device(four_process_job, reference):
    for cfg, per_rank in zip(FOUR_PROCESSES, four_process_job):
        assert_matches_one_device(cfg, per_rank, reference)


def test_beam_search_through_two_stages_equals_one_device(two_stage_job):
    for cfg, per_rank in zip(TWO_STAGES, two_stage_job):  # zbv: through both ranks' V
        assert_same_search(cfg, per_rank)


def test_beam_search_through_four_stages_and_replicas_equals_one_device(four_process_job):
    for cfg, per_rank in zip(FOUR_PROCESSES, four_process_job):
        assert_same_search(cfg, per_rank)
