"""The pieces compose the way a training loop calls them, and the package imports stay one-way."""
import subprocess
import sys

import torch

from megatron_vlm.rl.advantages import AdvantageConfig, AdvantageInputs, compute_advantages
from megatron_vlm.rl.losses import LossConfig, LossInputs, policy_loss_fn
from megatron_vlm.rl.sampling import informative_groups


def test_grpo_with_dapo_loss_learns_a_bandit():
    """A 4-armed bandit as a one-token 'language model': arm 2 is rewarded. 8 prompts x 4 samples
    per step; rewards -> GRPO advantages -> informative groups only -> DAPO loss -> SGD."""
    torch.manual_seed(0)
    logits = torch.zeros(4, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    groups = torch.arange(8).repeat_interleave(4)
    for _ in range(30):
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits, 0), 32, replacement=True)
            old = torch.log_softmax(logits, 0)[actions]
        rewards = (actions == 2).float()
        cu = torch.arange(33)
        keep = informative_groups(rewards, groups)
        adv = compute_advantages(AdvantageInputs(rewards, groups, keep.float(), cu), AdvantageConfig())
        logp = torch.log_softmax(logits, 0)[actions]
        loss, metrics = policy_loss_fn(LossInputs(logp, old, adv, keep.float(), cu), LossConfig(name="dapo"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.softmax(logits, 0)[2] > 0.9


def test_rl_and_data_modules_do_not_import_megatron_or_the_trainer():
    code = ("import sys; import megatron_vlm.rl.advantages, megatron_vlm.rl.losses, megatron_vlm.rl.preference, "
            "megatron_vlm.rl.rejection, megatron_vlm.rl.sampling, megatron_vlm.rl.curriculum, "
            "megatron_vlm.rl.overlong, megatron_vlm.data.templates, megatron_vlm.data.transforms; "
            "bad = [m for m in sys.modules if m.startswith(('megatron.core', 'megatron_vlm.trainer'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
