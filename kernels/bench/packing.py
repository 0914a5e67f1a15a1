"""Packing-plan figures on a long-tailed length distribution, beside the padding baselines.

Lengths are lognormal (mean `mean`, sigma 1) clipped to [16, max_len]; with `--image-fraction`,
that share of samples also carries an image of 64-1024 tokens (counted in its length and, through
PackCost.image, in its cost). Reported per scenario: real-token fill against the token budget and
against the plan's largest micro-batch (the shape a static-shape run would pad to), DP imbalance
(max / mean cost over ranks), micro-batch imbalance, planner time; and two baselines: every sample
padded to max_len, and dataset-order micro-batches padded to their longest sample.
"""
import math
import random
import time

from kernels.packing import PackCost, plan_packs, sample_costs


def long_tailed_lengths(n, mean, max_len, image_fraction=0.0, seed=0):
    rng = random.Random(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2  # lognormal with this mean before clipping
    lengths, images = [], []
    for _ in range(n):
        image = rng.randint(64, 1024) if rng.random() < image_fraction else 0
        text = max(16, int(rng.lognormvariate(mu, sigma)))
        total = min(max_len, text + image)
        lengths.append(total)
        images.append(min(image, total))
    return lengths, images


def padding_baselines(lengths, max_len, token_budget):
    real = sum(lengths)
    per_batch = max(1, token_budget // max_len)  # samples a [B, max_len] batch of the same budget holds
    padded_longest = sum(len(chunk) * max(chunk) for chunk in
                         (lengths[i: i + per_batch] for i in range(0, len(lengths), per_batch)))
    return {"pad_to_max_len": real / (len(lengths) * max_len), "pad_to_longest_in_batch": real / padded_longest}


def run(samples=4096, mean=800, max_len=8192, token_budget=16384, dp_size=8, image_fraction=0.3, hidden_size=4096):
    results = []
    for name, fraction in (("text", 0.0), ("text+images", image_fraction)):
        lengths, images = long_tailed_lengths(samples, mean, max_len, fraction)
        cost = PackCost(hidden_size=hidden_size)
        start = time.perf_counter()
        plan = plan_packs(lengths, token_budget, dp_size, image_tokens=images, cost=cost)
        seconds = time.perf_counter() - start
        stats = plan.stats(lengths, sample_costs(lengths, images, cost))
        results.append(dict(scenario=name, samples=samples, mean_len=sum(lengths) / samples, max_len=max(lengths),
                            token_budget=token_budget, dp_size=dp_size, planner_s=seconds, **stats,
                            **padding_baselines(lengths, max_len, token_budget)))
    return results


def format_table(results):
    head = (f"{'scenario':<12} {'mean':>6} {'mb/rank':>7} {'fill/budget':>11} {'fill/largest':>12} "
            f"{'DP imbal':>8} {'mb imbal':>8} {'pad-to-max':>10} {'pad-longest':>11} {'plan s':>6}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r['scenario']:<12} {r['mean_len']:6.0f} {r['microbatches_per_rank']:7d} "
                    f"{r['fill_vs_budget']:11.2%} {r['fill_vs_largest']:12.2%} {r['dp_imbalance']:8.4f} "
                    f"{r['microbatch_imbalance']:8.4f} {r['pad_to_max_len']:10.2%} "
                    f"{r['pad_to_longest_in_batch']:11.2%} {r['planner_s']:6.2f}")
    return "\n".join(rows)
