#!/usr/bin/env python3
"""Reference crop boxes for tests/image_folder.rs, computed by torchvision itself.

torchvision's RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3) is run on images of
many shapes with its random draws replaced by values from a list: each `uniform_(lo, hi)` takes
the next value u of the list and gives lo + (hi - lo) * u, each `randint(0, n)` gives
floor(u * n). The Rust test feeds the same lists to our RandomResizedCrop through the same two
rules, so the two are compared on the algorithm (ten tries, rounding, bounds, the centre-crop
fallback), not on the generators.

Writes tests/fixtures/crop_boxes.json. Run from the repository root:

    python3 scripts/reference/crop_fixtures.py

CI never runs this (it needs torch and torchvision); the JSON is committed.
"""

import json
import math
import os
import random
import types

import torch
import torchvision
import torchvision.transforms.transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "crop_boxes.json")


class Draws:
    """The list of draws, read in order, and the two rules that turn them into torch's."""

    def __init__(self, values):
        self.values = values
        self.used = 0

    def next(self):
        v = self.values[self.used]
        self.used += 1
        return v


def patched_torch(draws):
    """A stand-in for the `torch` module torchvision's transforms see: every attribute is
    torch's, except `empty(...).uniform_` and `randint`, which read the draws."""

    class Uniform:
        def uniform_(self, lo, hi):
            lo, hi = float(lo), float(hi)
            return torch.tensor([lo + (hi - lo) * draws.next()], dtype=torch.float64)

    fake = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fake.empty = lambda *a, **k: Uniform()
    fake.randint = lambda lo, hi, size=None: torch.tensor([lo + math.floor(draws.next() * (hi - lo))])
    return fake


def main():
    rng = random.Random(20261206)
    shapes = [(224, 224), (500, 375), (375, 500), (64, 48), (1, 1), (3, 2), (30, 300), (300, 30),
              (1000, 10), (17, 23), (4000, 3000), (32, 32)]
    cases = []
    for k in range(120):
        width, height = shapes[k % len(shapes)]
        # Forty draws cover ten tries of two uniforms each, and the two integers.
        values = [rng.random() for _ in range(40)]
        draws = Draws(values)
        original = T.torch
        T.torch = patched_torch(draws)
        try:
            img = torch.zeros(3, height, width)
            i, j, h, w = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        finally:
            T.torch = original
        cases.append({
            "width": width,
            "height": height,
            "draws": values[:draws.used],
            "used": draws.used,
            "box": [i, j, h, w],
        })
    fallbacks = sum(1 for c in cases if c["used"] == 20)
    with open(OUT + ".tmp", "w") as f:
        json.dump({
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cases": cases,
        }, f)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {len(cases)} cases ({fallbacks} through the fallback) to {OUT}")


if __name__ == "__main__":
    main()
