"""Data sets the binding's tests write for themselves: a Fashion-MNIST-shaped folder and a
fortune-style text folder, small and generated."""

import gzip
import struct

import numpy as np
import pytest


def write_idx_gz(path, magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A Fashion-MNIST-shaped folder: 28x28 images, 10 balanced classes, each class a bright
    square at its own place on a noisy background (so that training has something to learn)."""
    d = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 150)):
        labels = ((np.arange(n) * 7 + 3) % 10).astype(np.uint8)
        images = rng.integers(0, 48, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            top, left = 2 + (c // 4) * 8, 1 + (c % 4) * 6
            images[i, top : top + 7, left : left + 7] = rng.integers(180, 256, size=(7, 7))
        write_idx_gz(d / f"{prefix}-images-idx3-ubyte.gz", 0x0803, images)
        write_idx_gz(d / f"{prefix}-labels-idx1-ubyte.gz", 0x0801, labels)
    return d


@pytest.fixture(scope="module")
def fortunes_dir(tmp_path_factory):
    """Fortune-style entries (between `%` lines) of generated sentences."""
    d = tmp_path_factory.mktemp("fortunes")
    rng = np.random.default_rng(1)
    words = [f"w{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]
    entries = [" ".join(rng.choice(words, size=rng.integers(6, 14))) for _ in range(600)]
    (d / "generated").write_text("".join(e + "\n%\n" for e in entries))
    return d
