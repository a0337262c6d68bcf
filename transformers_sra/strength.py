"""How hard to remove the direction in each layer: a strength profile γ_l over depth.

Refusal is read out in the middle of the network; removing the direction just as hard from the first
layers costs harmless behaviour and buys little refusal. A profile is a tent over relative depth,
``γ(x) = floor + (peak − floor) · max(0, 1 − |x − center| / width)`` with ``x = layer / (n_layers − 1)``,
times a separate factor for attention-out and MLP-down writers::

    StrengthProfile(peak=1.0, floor=0.0, center=0.55, width=0.5).gammas(24)   # {layer: (γ_attn, γ_mlp)}
    StrengthProfile.parse(0.8)                                                # flat: 0.8 everywhere
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Union

from .errors import ConfigError

MAX_STRENGTH = 2.0


@dataclass(frozen=True)
class StrengthProfile:
    peak: float = 1.0  # γ at the center of the tent
    floor: float = 1.0  # γ far from the center (= peak: flat)
    center: float = 0.5  # relative depth of the peak, 0 = first layer, 1 = last
    width: float = 1.0  # half-width of the tent in relative depth
    attn: float = 1.0  # factor on attention-out writers
    mlp: float = 1.0  # factor on MLP-down writers (and experts)

    def __post_init__(self) -> None:
        for name in ("peak", "floor", "attn", "mlp"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_STRENGTH:
                raise ConfigError(f"strength profile: {name} must be in [0, {MAX_STRENGTH}], got {value}")
        if not 0 <= self.center <= 1 or self.width <= 0:
            raise ConfigError(f"strength profile: center must be in [0, 1] and width > 0, got {self.center}, {self.width}")
        if self.peak == 0 or max(self.attn, self.mlp) == 0:
            raise ConfigError("strength profile removes nothing: peak and at least one of attn/mlp must be > 0")

    @classmethod
    def parse(cls, strength: Union[float, int, Mapping[str, Any], "StrengthProfile"]) -> "StrengthProfile":
        """A number (flat γ), a dict of profile fields, or a profile."""
        if isinstance(strength, StrengthProfile):
            return strength
        if isinstance(strength, (int, float)) and not isinstance(strength, bool):
            if not 0 < strength <= MAX_STRENGTH:
                raise ConfigError(f"strength must be in (0, {MAX_STRENGTH}], got {strength}")
            return cls(peak=float(strength), floor=float(strength))
        if isinstance(strength, Mapping):
            unknown = set(strength) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"unknown strength profile fields {sorted(unknown)}; use peak, floor, center, width, attn, mlp")
            return cls(**{k: float(v) for k, v in strength.items()})
        raise ConfigError(f"strength must be a number or a profile dict, got {strength!r}")

    def gamma(self, layer: int, n_layers: int, kind: str) -> float:
        x = layer / max(n_layers - 1, 1)
        tent = max(0.0, 1.0 - abs(x - self.center) / self.width)
        return (self.floor + (self.peak - self.floor) * tent) * (self.attn if kind == "attn" else self.mlp)

    def gammas(self, n_layers: int) -> dict[int, tuple[float, float]]:
        return {i: (self.gamma(i, n_layers, "attn"), self.gamma(i, n_layers, "mlp")) for i in range(n_layers)}

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)
