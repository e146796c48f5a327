"""Seeded random faults and latency, reproducible from the request bytes rather than thread timing."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from simulator.config import SimConfig


@dataclass(frozen=True)
class Draw:
    """The random fault for one call (None = success) and its latency in seconds."""

    fault: str | None
    latency_s: float


def draw(config: SimConfig, body: bytes, occurrence: int) -> Draw:
    """Draw from a hash of (seed, occurrence of this exact body, body)."""
    digest = hashlib.sha256(f"{config.seed}:{occurrence}:".encode() + body).digest()
    rng = random.Random(digest)
    roll = rng.random()
    jitter = rng.uniform(-config.latency_jitter_ms, config.latency_jitter_ms)
    latency_s = max(0.0, config.latency_ms + jitter) / 1000
    threshold = 0.0
    for kind, rate in config.fault_rates().items():
        threshold += rate
        if roll < threshold:
            return Draw(kind, latency_s)
    return Draw(None, latency_s)
