"""Packs under context parallelism: every sample padded to a multiple of 2*CP, each CP rank holding
chunks r and 2*CP-1-r of every sample (Transformer Engine's THD cut, which megatron's THD rotary
path assumes), and the per-token tensors of a pack cut the same way as the tokens. The model-level
equivalence (loss, gradients, log-probs at CP2, CP2 x TP2, CP2 x EP2) is test_packed_update.py."""
import math

import pytest
import torch

from megatron_vlm.parallel.batching import thd_cp_index
from megatron_vlm.trainer.actor_batch import pack_rows, sample_spans
from megatron_vlm.trainer.sft import labelled_sample
from megatron_vlm.trainer.actor_batch import build_batch
from tests.rollout.test_embedded import fixture_requests


def test_each_rank_holds_its_two_chunks_of_every_sample():
    cu = [0, 4, 12]                       # two samples, padded spans 4 and 8, cp = 2 (chunks of 1 and 2)
    assert thd_cp_index(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert thd_cp_index(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    for cp in (2, 4):
        cu = [0, 8 * cp, 12 * cp, 20 * cp]
        index = torch.cat([thd_cp_index(cu, cp, r) for r in range(cp)])
        assert sorted(index.tolist()) == list(range(20 * cp))  # the ranks partition the pack
    with pytest.raises(ValueError, match="not divisible by 2\\*cp = 4"):
        thd_cp_index([0, 6], 2, 0)


def _batch():
    requests, prepared = fixture_requests()
    samples = [labelled_sample(r.request_id, prepared[r.request_id].input_ids.tolist(), [11, 12, 7][: i + 1])
               for i, r in enumerate(requests)]
    return build_batch(samples, prepared, pad_id=0, spatial_merge_size=2)


@pytest.mark.parametrize("cp,tp_sp", [(2, 1), (2, 2), (4, 1)])
def test_a_cp_pack_pads_each_sample_and_cuts_every_tensor_like_the_tokens(cp, tp_sp):
    batch, images, patches = _batch()
    rows = [2, 0, 1]
    lengths = [batch.row_lengths()[r] for r in rows]
    multiple = math.lcm(2 * cp, cp * tp_sp)  # what pack_padding gives (tp_sp: TP under sequence parallelism)
    packs = [pack_rows(batch, rows, images, patches, pad_to_multiple=multiple, cp=(cp, r)) for r in range(cp)]
    full = packs[0]
    assert full.spans[:-1] == sample_spans(lengths, cp)[:-1] and all(s % (2 * cp) == 0 for s in full.spans)
    assert full.tokens % multiple == 0 and (full.tokens // cp) % tp_sp == 0
    starts = full.boundaries()
    assert starts == full.cu_seqlens_padded.tolist()
    for r, n, start in zip(rows, lengths, starts):   # each sample's real tokens at its padded start
        assert torch.equal(full.input_ids[0, start:start + n], batch.input_ids[r, :n])
        span = full.spans[rows.index(r)]
        assert float(full.loss_mask[start + n:start + span].abs().sum()) == 0
    out = torch.zeros_like(batch.loss_mask)
    full.put(full.take(batch.loss_mask), out)          # take / put round trip over padded spans
    assert torch.equal(out, batch.loss_mask)
    local = [p.local(p.labels) for p in packs]
    assert all(len(x) == full.tokens // cp for x in local)
    for rank, x in enumerate(local):                   # local = the tokens at the rank's positions
        assert torch.equal(x, full.labels[thd_cp_index(starts, cp, rank)])
    assert torch.equal(packs[1].local_cu_seqlens, full.cu_seqlens_padded // cp)
