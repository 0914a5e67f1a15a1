"""Built-in verifiers; importing this package registers them (see `registry`)."""
from megatron_vlm.rewards.verifiers import (choice, formula, instructions, math_answer,  # noqa: F401
                                            numeric, simple, subquestions)
