"""Imported by every reward worker before it reports ready (and once by the fork server, whose
forks inherit the result): runs each built-in verifier once, so that a job never pays for
importing sympy or math-verify, building the LaTeX parser, or filling sympy's caches inside its
timeout. A fresh worker replacing a killed one is then ready as soon as it is forked.
"""
import logging

from megatron_vlm.rewards.registry import get_verifier

WARMUP_CASES = (
    ("math", "The answer is \\boxed{\\frac{1}{2}}", "0.5", {}),
    ("formula", "\\boxed{x^2+2x+1}", "(x+1)^2", {}),
    ("formula", "y = 2x + 1", "2x - y + 1 = 0", {}),
    ("numeric", "\\boxed{1.2 \\times 10^{-3}}", "0.0012", {}),
    ("choice", "The answer is (B).", "B", {"options": ["a", "b"]}),
)


def warm_up() -> None:
    for name, response, reference, metadata in WARMUP_CASES:
        try:
            get_verifier(name)(response, reference, metadata)
        except Exception:  # a broken verifier is reported by the jobs that use it
            logging.getLogger(__name__).exception("warm-up of verifier %r failed", name)


warm_up()
