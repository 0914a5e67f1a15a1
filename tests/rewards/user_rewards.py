"""User rewards for the extension contract tests, named by dotted path (`<this module>:<fn>`).

Each follows the documented signature `fn(response, reference, metadata) -> float`.
"""
import os
import time


def exact_match(response: str, reference, metadata) -> float:
    return float(response.strip() == str(reference))


def length_penalty(response: str, reference, metadata) -> float:
    return -len(response) / float(metadata.get("scale", 100))


def raises(response: str, reference, metadata) -> float:
    raise RuntimeError(f"user reward failed on {response!r}")


class _NotAnException(BaseException):
    """Like math-verify's TimeoutException: escapes `except Exception`."""


def raises_base_exception(response: str, reference, metadata) -> float:
    raise _NotAnException("escaped except Exception")


def raises_unless_ok(response: str, reference, metadata) -> float:
    """A verifier broken for most of the data: it parses nothing but "ok"."""
    if response != "ok":
        raise ValueError(f"cannot parse {response!r}")
    return 1.0


def hangs(response: str, reference, metadata) -> float:
    while True:  # a busy loop, as sympy does; `time.sleep` would be as deadly
        pass


def sleeps(response: str, reference, metadata) -> float:
    time.sleep(float(metadata["seconds"]))
    return 1.0


def exits(response: str, reference, metadata) -> float:
    os._exit(3)  # a crash that takes the worker process down


def returns_nan(response: str, reference, metadata) -> float:
    return float("nan")


def wrong_signature(response: str) -> float:
    return 0.0


def returns_text(response: str, reference, metadata) -> float:
    return "1.0"


_calls = [0]


def not_deterministic(response: str, reference, metadata) -> float:
    _calls[0] += 1
    return float(_calls[0])


def torch_imported(response: str, reference, metadata) -> float:
    import sys
    return float("torch" in sys.modules)


def returns_bool(response: str, reference, metadata) -> bool:
    return response == "yes"


def returns_int(response: str, reference, metadata) -> int:
    return len(response)
