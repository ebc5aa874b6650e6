#!/usr/bin/env python3
"""The peer of Recycle's image-folder pipeline: torchvision's ImageFolder with PIL, the same
transforms on the same files, timed on one core.

    python3 scripts/reference/image_folder_peer.py make DIR [--count 400]
    python3 scripts/reference/image_folder_peer.py measure DIR [--size 224] [--passes 2]

`make` writes a benchmark folder in ImageNet's layout (train/<class>/*.JPEG, val/<class>/*):
photographs are not shipped, so the images are synthetic, sized like ImageNet's (500x375 and
375x500, JPEG quality 90, about 80 KB each where ImageNet averages about 110 KB, a few
greyscale): smooth random shapes with texture and noise, drawn from a fixed seed so the
folder is the same on every machine.

`measure` decodes and transforms every training image with
RandomResizedCrop(size) + RandomHorizontalFlip + ToTensor + Normalize(ImageNet), and every
validation image with Resize(size * 256 / 224) + CenterCrop(size) + ToTensor + Normalize, on
one thread (torch.set_num_threads(1), no DataLoader workers), and prints images per second.
Compare with `cargo run --release --example image_folder_throughput -- DIR` (one decoding
thread). Needs torch, torchvision and Pillow; CI never runs this.
"""

import argparse
import os
import random
import sys
import time


def make(root, count):
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(20261206)
    classes = ["n0000%d" % k for k in range(4)]
    for split, n in (("train", count), ("val", max(count // 4, 4))):
        for k in range(n):
            cls = classes[k % len(classes)]
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            w, h = (500, 375) if k % 3 else (375, 500)
            base = tuple(rng.randrange(256) for _ in range(3))
            img = Image.new("RGB", (w, h), base)
            draw = ImageDraw.Draw(img)
            for _ in range(40):
                x0, y0 = rng.randrange(w), rng.randrange(h)
                x1, y1 = x0 + rng.randrange(20, 250), y0 + rng.randrange(20, 250)
                colour = tuple(rng.randrange(256) for _ in range(3))
                if rng.random() < 0.5:
                    draw.ellipse((x0, y0, x1, y1), fill=colour)
                else:
                    draw.rectangle((x0, y0, x1, y1), fill=colour)
            img = img.filter(ImageFilter.GaussianBlur(2))
            noise = Image.effect_noise((w, h), 40).convert("RGB")
            img = Image.blend(img, noise, 0.3)
            if k % 17 == 5:
                img = img.convert("L")
            path = os.path.join(folder, "img_%05d.JPEG" % k)
            img.save(path + ".tmp", format="JPEG", quality=90)
            os.replace(path + ".tmp", path)
    print("wrote", root)


def measure(root, size, passes):
    import torch
    import torchvision
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    eval_tf = transforms.Compose([
        transforms.Resize(size * 256 // 224),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        normalize,
    ])
    torch.manual_seed(0)
    import PIL

    print("torch %s, torchvision %s, Pillow %s, Python %s" % (
        torch.__version__, torchvision.__version__, PIL.__version__, sys.version.split()[0]))
    for split, tf in (("train", train_tf), ("val", eval_tf)):
        ds = datasets.ImageFolder(os.path.join(root, split), transform=tf)
        # One untimed pass warms the page cache, as the Rust side's first pass does.
        for i in range(len(ds)):
            ds[i]
        t0 = time.perf_counter()
        for _ in range(passes):
            for i in range(len(ds)):
                x, _ = ds[i]
        dt = time.perf_counter() - t0
        n = passes * len(ds)
        print("%s views: %d images in %.2f s: %.1f images/s on 1 thread" % (split, n, dt, n / dt))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir")
    m.add_argument("--count", type=int, default=400)
    r = sub.add_parser("measure")
    r.add_argument("dir")
    r.add_argument("--size", type=int, default=224)
    r.add_argument("--passes", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.dir, a.count)
    else:
        measure(a.dir, a.size, a.passes)


if __name__ == "__main__":
    main()
