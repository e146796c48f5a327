"""Simulator settings: the SimConfig dataclass."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_FORMATS = ("png", "jpeg")

# Random fault kinds in the order their probability bands are laid out; each is also a script item.
FAULT_KINDS = ("429", "500", "503", "timeout", "safety", "malformed")


@dataclass(frozen=True)
class SimConfig:
    """How the simulated upstream behaves. Rates are probabilities in [0, 1] summing to at most 1."""

    api_key: str | None = None
    seed: int = 0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    image_bytes: int = 0
    image_format: str = "png"
    fault_429: float = 0.0
    fault_500: float = 0.0
    fault_503: float = 0.0
    fault_timeout: float = 0.0
    fault_safety: float = 0.0
    fault_malformed: float = 0.0
    retry_delay_s: float = 1.0
    hang_s: float = 30.0

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}")
        rates = self.fault_rates()
        if any(not 0.0 <= rate <= 1.0 for rate in rates.values()) or sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates must each be in [0, 1] and sum to at most 1")
        amounts = (self.latency_ms, self.latency_jitter_ms, self.image_bytes, self.retry_delay_s, self.hang_s)
        if min(amounts) < 0:
            raise ValueError("latencies, sizes and delays must not be negative")

    def fault_rates(self) -> dict[str, float]:
        """Fault kind -> probability, in FAULT_KINDS order."""
        return {kind: getattr(self, f"fault_{kind}") for kind in FAULT_KINDS}
