"""A reward for the resume test: a fixed function of the response text, so a random policy's
groups are informative (the verifier would score every answer 0: ties that train nothing)."""


def shaped(response: str, reference, metadata) -> float:
    return (sum(map(ord, response)) % 7) / 6
