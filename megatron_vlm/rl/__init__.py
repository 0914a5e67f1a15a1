"""RL algorithms as pure functions: advantages, policy and preference losses, batch filters.

    tokens.py       the layout every function takes: packed [T] tokens + cu_seqlens [S + 1]
                    (as kernels.policy_loss); flatten_padded views a padded [B, L] batch that way
    advantages.py   grpo (Dr. GRPO without std), rloo, reinforce_pp_baseline: [S] rewards -> [T]
    losses.py       ppo, dapo, dual_clip, gspo (through kernels.policy_loss), intern_s1; KL none/k1/k2/k3
    preference.py   dpo, mpo (DPO + BCO quality + SFT) on chosen / rejected pairs
    rejection.py    best-of-N rejection sampling: verifier-scored rollouts -> SFT examples
    sampling.py     DAPO dynamic sampling (drop equal-reward groups, draw until full, capped)
    curriculum.py   difficulty-adaptive tier mixes (GLM-4.5V) and curriculum stages
    overlong.py     DAPO soft over-long penalty, masking truncated responses, GLM-4.5V forced answer
    registry.py     name -> function registries (duplicates rejected, unknown names list the known)

Each algorithm is registered by name and configured by a small validated dataclass; losses return
(loss, metrics as tensors). Nothing here imports megatron-core or the trainer: the trainer calls in.
"""
