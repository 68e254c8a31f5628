"""Codecs: one projected-gradient estimate <-> one payload element (DESIGN §3).

Every rank decodes every code and advances the codec's shared state from the same code vector, in plain Python
float64 arithmetic, so the state (and hence every decoded value) is identical on all ranks and on replay.
Reserved codes: SKIP (-128) = no contribution (non-finite loss); STOP (-127) = the rank is stopping (SIGTERM),
no contribution, and every rank stops after this step. Estimates therefore use codes -126..126.

Bounded peers (DESIGN I7): a code outside a codec's range (127 in int8, which no rank sends, is what a sum of two
ranks' writes into one slot can wrap to) is an `ExchangeError` naming the step and slot, never an estimate, SKIP or
STOP; `check_received` also compares a rank's own slots with what it sent (a peer writing into them).
"""

from __future__ import annotations

import math

import torch

from .philox import CODEC_STREAM, derive_seed, philox_blocks_numpy

SKIP, STOP = -128, -127
QMAX = 126


def _uniform(step: int, slot: int) -> float:
    """A uniform [0, 1) draw from the shared generator, keyed by (step, slot): reproducible on replay."""
    word = int(philox_blocks_numpy(0, 1, derive_seed(0, step, slot, CODEC_STREAM))[0, :4].view("<u4")[0])
    return word / 2**32


class ExchangeError(RuntimeError):
    """The exchanged payload is not what honest ranks can produce: a peer wrote outside its slots or its range."""


class Codec:
    """Base: int8 payload, one byte per estimate."""

    name = "base"
    dtype = torch.int8
    skip, stop = SKIP, STOP
    breaks_one_byte = False
    max_code = QMAX  # largest |code| an estimate may use
    legacy_defaults: dict = {}  # init arguments a log header written before they existed implies

    def encode(self, g: float, step: int, slot: int) -> int:
        raise NotImplementedError

    def decode(self, code: int) -> float:
        raise NotImplementedError

    def advance(self, codes: list) -> None:
        """Update the shared state from the whole step's code vector (after decoding it)."""

    def is_estimate(self, code) -> bool:
        return code != self.skip and code != self.stop

    def in_range(self, code) -> bool:
        """Whether one honest rank can have sent `code` (an estimate within +-max_code, SKIP or STOP)."""
        return not self.is_estimate(code) or abs(code) <= self.max_code

    @property
    def bytes_per_slot(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def config(self) -> dict:
        """How to rebuild this codec in its initial state (stored in the trajectory log's header)."""
        return {"_target_": f"lightning_zo.{type(self).__qualname__}", **getattr(self, "init_args", {})}


def codec_from_config(config: dict) -> Codec:
    """Rebuild a codec from a log header. Our own codecs are found by class name, whatever module path the header
    names (logs written before the package's layers record `lightning_zo.codecs.LinearCodec`)."""
    import importlib

    module, _, name = config["_target_"].rpartition(".")
    if module.split(".")[0] == "lightning_zo" and isinstance(globals().get(name), type):
        cls = globals()[name]
    else:
        cls = getattr(importlib.import_module(module), name)
    args = {k: v for k, v in config.items() if k != "_target_"}
    return cls(**{**getattr(cls, "legacy_defaults", {}), **args})


def check_received(codec: Codec, received, step: int, sent=None, own: slice | None = None) -> None:
    """Raise ExchangeError unless every summed code is in the codec's range and this rank's own slots (`own`)
    came back exactly as it sent them (`sent`: the payload it put on the wire). Every rank runs the range check
    on the same vector, so all raise together; only the owner of a slot can see that a peer wrote into it."""
    codes = received.tolist() if hasattr(received, "tolist") else list(received)
    for slot, code in enumerate(codes):
        if not codec.in_range(code):
            raise ExchangeError(f"step {step}: slot {slot} holds code {code}, outside the {codec.name} codec's range "
                                f"(+-{codec.max_code}, {codec.skip} skip, {codec.stop} stop): a peer wrote outside "
                                "its own slots or range; refusing to apply it")
    if sent is None or own is None:
        return
    mine = sent.tolist() if hasattr(sent, "tolist") else list(sent)
    for slot in range(*own.indices(len(codes))):
        if not _same(codes[slot], mine[slot]):
            raise ExchangeError(f"step {step}: slot {slot} (this rank's own) came back as {codes[slot]}, but this "
                                f"rank sent {mine[slot]}: a peer wrote into it; refusing to apply it")


def _same(a, b) -> bool:
    return a == b or (a != a and b != b)  # NaN (the float codec's SKIP) equals itself here


SCALE_RULES = ("robust", "ema")


class LinearCodec(Codec):
    """q = round(g / scale) clipped to +-126, with a scale every rank derives from the decoded history.

    rule="robust" (default, DESIGN I7): each step's statistic is the lower median of the valid slots' |g_hat|
    (so a minority of slots, or one rank of two, cannot raise it above an honest slot's value); the scale tracks an
    exponential average (`beta`) of it so that a typical estimate lands near `target`. When the median itself is
    clipped (most slots saturated) the average jumps to it. The scale moves by at most a factor `max_growth` per
    step and stays within [init_scale / scale_range, init_scale * scale_range], whatever the codes.
    rule="ema" is the rule of logs written before (mean |g_hat|; any one clipped code doubled the scale, so one
    rank sending +126 every step doubled it every step); it is kept so that those logs replay exactly.
    Optional stochastic rounding (unbiased) draws its uniform from the shared generator. Plain float64 arithmetic.
    """

    name = "linear"
    legacy_defaults = {"rule": "ema"}

    def __init__(self, init_scale: float = 0.05, target: float = 16.0, beta: float = 0.9,
                 stochastic_rounding: bool = True, rule: str = "robust", max_growth: float = 2.0,
                 scale_range: float = 2.0 ** 20):
        if init_scale <= 0 or target <= 0 or not 0 <= beta < 1:
            raise ValueError("linear codec needs init_scale > 0, target > 0 and 0 <= beta < 1")
        if rule not in SCALE_RULES:
            raise ValueError(f"unknown linear codec rule {rule!r}; choose one of {', '.join(SCALE_RULES)}")
        if not max_growth > 1 or not scale_range >= 1 or not math.isfinite(max_growth * scale_range):
            raise ValueError("linear codec needs finite max_growth > 1 and scale_range >= 1")
        self.init_args = {"init_scale": init_scale, "target": target, "beta": beta,
                          "stochastic_rounding": stochastic_rounding, "rule": rule}
        if rule == "robust":
            self.init_args.update(max_growth=max_growth, scale_range=scale_range)
        self.scale = float(init_scale)
        self.target, self.beta = float(target), float(beta)
        self.stochastic_rounding = stochastic_rounding
        self.rule, self.max_growth = rule, float(max_growth)
        self.min_scale, self.max_scale = init_scale / scale_range, init_scale * scale_range
        self.ema: float | None = None

    def encode(self, g: float, step: int, slot: int) -> int:
        x = g / self.scale
        q = math.floor(x + _uniform(step, slot)) if self.stochastic_rounding else round(x)
        return max(-QMAX, min(QMAX, q))

    def decode(self, code: int) -> float:
        return code * self.scale

    def advance(self, codes: list) -> None:
        valid = [int(c) for c in codes if self.is_estimate(c)]
        if not valid:
            return
        if self.rule == "ema":
            self._advance_ema(valid)
            return
        median = sorted(abs(c) for c in valid)[(len(valid) - 1) // 2]  # lower median
        typical = median * self.scale
        if self.ema is None or median == QMAX:
            self.ema = typical if self.ema is None else max(self.ema, typical)
        else:
            self.ema = self.beta * self.ema + (1 - self.beta) * typical
        proposed = min(max(self.ema / self.target, self.scale / self.max_growth), self.scale * self.max_growth)
        self.scale = min(max(proposed, self.min_scale), self.max_scale)

    def _advance_ema(self, valid: list) -> None:
        mean_abs = sum(abs(c) for c in valid) * self.scale / len(valid)
        self.ema = mean_abs if self.ema is None else self.beta * self.ema + (1 - self.beta) * mean_abs
        new_scale = max(self.ema / self.target, 1e-30)
        if any(abs(c) == QMAX for c in valid):
            new_scale = max(new_scale, 2 * self.scale)
        self.scale = new_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.ema = state["scale"], state["ema"]


# 2**(i/4) for i = 0..3, as exact float literals so decoding needs no libm (identical on every platform).
_QUARTER_OCTAVES = (1.0, 1.189207115002721, 1.4142135623730951, 1.681792830507429)


class LogCodec(Codec):
    """The paper's signed-log code in 8 bits: sign * 2**(min_exp + (|q| - 1) / 4) for |q| in 1..126, 0 below.

    Four levels per octave (relative error <= 9 %) over 31 octaves from 2**min_exp; no state to share.
    """

    name = "log"

    def __init__(self, min_exp: int = -20):
        self.min_exp = int(min_exp)
        self.init_args = {"min_exp": self.min_exp}

    def encode(self, g: float, step: int, slot: int) -> int:
        mag = abs(g)
        if mag < 2.0 ** self.min_exp:
            return 0
        level = round(4 * (math.log2(mag) - self.min_exp)) + 1
        return int(math.copysign(max(1, min(QMAX, level)), g))

    def decode(self, code: int) -> float:
        if code == 0:
            return 0.0
        i = abs(code) - 1
        return math.copysign(math.ldexp(_QUARTER_OCTAVES[i % 4], self.min_exp + i // 4), code)

    def state_dict(self) -> dict:
        return {"min_exp": self.min_exp}


class SignCodec(Codec):
    """sign(g) * magnitude: one bit of information in one byte."""

    name = "sign"
    max_code = 1

    def __init__(self, magnitude: float = 1.0):
        self.magnitude = float(magnitude)
        self.init_args = {"magnitude": self.magnitude}

    def encode(self, g: float, step: int, slot: int) -> int:
        return (g > 0) - (g < 0)

    def decode(self, code: int) -> float:
        return code * self.magnitude

    def state_dict(self) -> dict:
        return {"magnitude": self.magnitude}


class NoneCodec(Codec):
    """Ablation: the float32 estimate itself (4 bytes per slot). Breaks the one-byte property, on purpose."""

    name = "none"
    dtype = torch.float32
    skip, stop = math.nan, -math.inf
    breaks_one_byte = True

    def encode(self, g: float, step: int, slot: int) -> float:
        return g

    def decode(self, code: float) -> float:
        return float(code)

    def is_estimate(self, code) -> bool:
        return math.isfinite(float(code))

    def in_range(self, code) -> bool:
        return not float(code) == math.inf  # finite, NaN (skip) or -inf (stop); +inf no rank sends


def is_stop(codec: Codec, code) -> bool:
    return float(code) == float(codec.stop)
