"""How faithfully each codec carries a real sequence of projected gradients (from a run's metrics.csv).

    python scripts/codec_fidelity.py RUN_DIR/csv/metrics.csv

Feeds the logged estimates g_t through each codec exactly as a 1-rank run would (encode, then advance the shared
state) and reports the decoded values' relative RMS error, sign agreement and mean bias relative to mean |g|.
"""

import csv
import math
import sys

from lightning_zo.core.codecs import LinearCodec, LogCodec, NoneCodec, SignCodec


def fidelity(codec, grads):
    decoded = []
    for t, g in enumerate(grads):
        q = codec.encode(g, t, 0)
        decoded.append(codec.decode(q))
        codec.advance([q])
    err = math.sqrt(sum((d - g) ** 2 for d, g in zip(decoded, grads)) / sum(g * g for g in grads))
    signs = sum((d > 0) == (g > 0) for d, g in zip(decoded, grads) if d != 0) / len(grads)
    bias = (sum(decoded) - sum(grads)) / len(grads) / (sum(abs(g) for g in grads) / len(grads))
    return err, signs, bias


def main(path):
    with open(path) as f:
        grads = [float(r["train/projected_grad"]) for r in csv.DictReader(f) if r.get("train/projected_grad")]
    print(f"{len(grads)} logged estimates, mean |g| = {sum(map(abs, grads)) / len(grads):.4g}")
    print("| codec | bytes/step/rank | relative RMS error | sign agreement | bias / mean abs(g) |")
    print("|---|---|---|---|---|")
    for name, codec in [("linear (default)", LinearCodec()), ("linear, no stochastic rounding",
                         LinearCodec(stochastic_rounding=False)), ("log", LogCodec()),
                        ("sign", SignCodec()), ("none (float32)", NoneCodec())]:
        err, signs, bias = fidelity(codec, grads)
        print(f"| {name} | {codec.bytes_per_slot} | {err:.3f} | {signs:.3f} | {bias:+.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
