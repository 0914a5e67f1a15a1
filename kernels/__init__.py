"""Triton kernels with plain-torch references. Imports only torch and triton.

    logprobs.py     linear_logprobs: log-probs and entropy from hidden states and a (vocab-parallel)
                    head, never holding [T, V] fp32 logits
    policy_loss.py  policy_loss / fused_linear_policy_loss: PPO / DAPO / dual-clip / GSPO with
                    k1 / k2 / k3 KL and four aggregations; fused with the head, gradients formed in
                    the forward
    packing.py      plan_packs (token budget, DP / micro-batch balance), pack / unpack, cu_seqlens,
                    position ids, M-RoPE positions, THD PackedSeqParams fields
    reference.py    the plain-torch specification of all of the above
    bench/          `python -m kernels.bench`: providers, time / CPU time / peak memory, packing figures

    interpret.py    makes Triton's CPU interpreter compute bf16 dots, so tests run the bf16 branch

Each op dispatches with impl="auto": Triton for CUDA tensors, a fused plain-torch path otherwise;
tests run the Triton kernels on CPU under TRITON_INTERPRET=1.
"""
