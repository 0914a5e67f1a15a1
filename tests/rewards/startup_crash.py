"""Preloaded by reward workers in the start-up tests (never imported by the test process).

STARTUP_CRASH=raise: raises at import; =exit: exits the process; =once:<path>: raises the first
time (creating <path>) and imports cleanly after that.
"""
import os

_MODE = os.environ.get("STARTUP_CRASH", "")
if _MODE == "raise":
    raise RuntimeError("boom at start-up")
if _MODE == "exit":
    os._exit(7)
if _MODE.startswith("once:"):
    _MARKER = _MODE.split(":", 1)[1]
    if not os.path.exists(_MARKER):
        open(_MARKER, "w").close()
        raise RuntimeError("first start fails")
