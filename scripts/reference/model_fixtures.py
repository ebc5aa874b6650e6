#!/usr/bin/env python3
"""PyTorch reference fixtures for recycle-models (ResNet v1.5 and BERT MLM parity tests).

Writes, with fixed seeds, small safetensors files under models/tests/fixtures/:

  resnet18_fmnist.safetensors  ResNet-18, small stem (3x3 conv, stride 1, no max-pool),
                               1x28x28 input, 10 classes, width 1/8
  resnet50_64.safetensors      ResNet-50, ImageNet stem, 3x64x64 input, 10 classes, width 1/16
  bert_tiny.safetensors        BertForMaskedLM, 2 layers, hidden 128, 2 heads, vocabulary 256,
                               sequences of 32 with padding, dropout off

Each file holds the model's state dict under `param.<name>` / `buffer.<name>`, the inputs under
`input.*`, and for each mode (`train`: batch statistics; `eval`: running statistics) the logits,
the loss and the gradient of every parameter (`<mode>.grad.<name>`); ResNet files also hold the
running statistics after the training-mode forward (`train.buffer_after.<name>`).

Weights and inputs are drawn in float32 and stored as float32; the forward and backward run in
float64 (exact widening), so the fixtures hold the true values of the f32 model and a test's
error is the engine's own, not the sum of two f32 implementations' rounding.

The ResNet is written out here with torchvision's exact parameter names because torchvision
has no width multiplier; the script asserts that at width 1 its state dict has the same names
and shapes as torchvision's resnet18 / resnet50. BERT is Hugging Face's own BertForMaskedLM.
Also prints the parameter counts the models crate asserts (ResNet-50 with 1000 classes,
BERT-base MLM with vocabulary 30,522).

Run from the repository root:  python3 scripts/reference/model_fixtures.py
(needs torch, torchvision, transformers, safetensors; CI does not run this script)
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join("models", "tests", "fixtures")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # v1.5: the stride sits on the 3x3 convolution
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self, depth, num_classes, in_channels=3, small_stem=False, width=1.0):
        super().__init__()
        block, layers = {
            18: (BasicBlock, [2, 2, 2, 2]),
            34: (BasicBlock, [3, 4, 6, 3]),
            50: (Bottleneck, [3, 4, 6, 3]),
        }[depth]
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        self.small_stem = small_stem
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.small_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def check_against_torchvision():
    import torchvision

    for depth, ctor in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        ours = {k: tuple(v.shape) for k, v in ResNet(depth, 1000).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in ctor().state_dict().items()}
        assert ours == theirs, f"resnet{depth}: names or shapes differ from torchvision"
    n50 = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    print(f"torchvision resnet50 parameters: {n50}")


# BatchNorm biases are drawn around this value so that few pre-activations sit near ReLU's
# kink: in training mode a small ResNet-50 at 64x64 has only N*2*2 values per channel in
# layer4, and a single ReLU (or max-pool) decision flipped by f32 rounding moves a weight
# gradient by ~1/(N*H*W) -- far above the tests' 1e-3. `check_conditioning` verifies the result.
BN_BIAS_SHIFT = 0.0


def randomise_batchnorm(model, gen):
    # Fresh BatchNorm layers are the identity (weight 1, bias 0, mean 0, var 1): give them
    # values so that a wrong formula cannot pass.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1 + BN_BIAS_SHIFT)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(3)


def state_tensors(model):
    out = {}
    params = dict(model.named_parameters())
    for k, v in model.state_dict().items():
        prefix = "param." if k in params else "buffer."
        v = v.detach().clone().contiguous()
        out[prefix + k] = v.float() if v.is_floating_point() else v
    return out


def run_mode(model, mode, inputs, loss_fn):
    model.train(mode == "train")
    model.zero_grad()
    logits, loss = loss_fn(model, inputs)
    loss.backward()
    out = {f"{mode}.logits": logits.detach().float().contiguous(),
           f"{mode}.loss": loss.detach().float().reshape(1)}
    for k, p in model.named_parameters():
        if p.grad is not None:
            out[f"{mode}.grad.{k}"] = p.grad.detach().float().clone().contiguous()
    return out


def resnet_fixture(name, depth, in_ch, hw, small_stem, width, batch, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ResNet(depth, 10, in_channels=in_ch, small_stem=small_stem, width=width)
    randomise_batchnorm(model, gen)
    tensors = state_tensors(model)
    model = model.double()
    x = torch.randn(batch, in_ch, hw, hw, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    tensors["input.x"] = x
    tensors["input.labels"] = y.to(torch.int32)
    x = x.double()

    def loss_fn(m, _):
        logits = m(x)
        return logits, F.cross_entropy(logits, y)

    # Evaluation first: the training-mode forward updates the running statistics.
    tensors.update(run_mode(model, "eval", None, loss_fn))
    tensors.update(run_mode(model, "train", None, loss_fn))
    for k, v in model.state_dict().items():
        if "running_" in k or "num_batches" in k:
            v = v.detach().clone().contiguous()
            tensors[f"train.buffer_after.{k}"] = v.float() if v.is_floating_point() else v
    path = os.path.join(OUT, f"{name}.safetensors")
    save_file(tensors, path)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"{path}: {nparams} parameters, {os.path.getsize(path) / 1e6:.2f} MB")
    check_conditioning(name, tensors, loss_fn, model)


def check_conditioning(name, tensors, loss_fn, model64):
    """Prints how well-conditioned the fixture is, for whoever reads a failing test: PyTorch's
    own f32 error against these f64 values, and how much the f64 gradients move for a 1e-6
    relative change of the input. Training-mode BatchNorm in a small ResNet-50 at 64x64 sees
    only N*2*2 values per channel in layer4, which amplifies rounding (PyTorch f32 is off by
    a few 1e-2 on this fixture; the engine computes BatchNorm's statistics and backward in f64
    and stays within 1e-3)."""
    import copy

    model32 = copy.deepcopy(model64).float()
    x = tensors["input.x"]
    y = tensors["input.labels"].long()
    model32.load_state_dict({k: v for k, v in model64.state_dict().items()})
    # restore the buffers as they were before the training-mode pass above
    for k, v in tensors.items():
        if k.startswith("buffer."):
            model32.state_dict()[k[len("buffer."):]].copy_(v)
    model32.train()
    model32.zero_grad()
    F.cross_entropy(model32(x), y).backward()
    worst = 0.0
    for k, p in model32.named_parameters():
        ref = tensors[f"train.grad.{k}"].double()
        err = ((p.grad.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        worst = max(worst, err)
    print(f"  {name}: PyTorch f32 vs f64, worst training-mode gradient error {worst:.2e}")
    # Sensitivity of the f64 gradients to a 1e-6 relative change of the input: a large value
    # means ReLU / max-pool decisions sit within f32 rounding of their kinks, so an f32 code
    # with its own summation order cannot match these gradients tensor by tensor.
    gen = torch.Generator().manual_seed(1)
    x2 = x.double() * (1 + 1e-6 * torch.randn(x.shape, dtype=torch.float64, generator=gen))
    model64.zero_grad()
    F.cross_entropy(model64(x2), y).backward()
    sens = max(
        ((p.grad - tensors[f"train.grad.{k}"].double()).abs().max()
         / tensors[f"train.grad.{k}"].double().abs().max().clamp_min(1e-12)).item()
        for k, p in model64.named_parameters()
    )
    print(f"  {name}: f64 gradient change for a 1e-6 input perturbation {sens:.2e}")


def bert_fixture(seed):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = BertConfig(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = BertForMaskedLM(cfg)
    # Non-trivial LayerNorm and bias values.
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "LayerNorm.weight" in k:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif k.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    batch, seq = 4, 32
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=gen)
    lengths = torch.tensor([32, 27, 20, 32])
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).to(torch.int64)
    ids[attn == 0] = 0
    token_types = torch.zeros_like(ids)
    token_types[:, seq // 2 :] = 1
    labels = torch.full((batch, seq), -100)
    masked = (torch.rand(batch, seq, generator=gen) < 0.15) & (attn == 1)
    masked[0, 3] = True  # at least one masked position per row
    masked[1, 5] = True
    masked[2, 7] = True
    masked[3, 9] = True
    labels[masked] = torch.randint(5, cfg.vocab_size, (int(masked.sum()),), generator=gen)

    tensors = {}
    sd = model.state_dict()
    for k, v in sd.items():
        if k in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"):
            continue  # tied to word_embeddings / cls.predictions.bias
        tensors["param." + k] = v.detach().clone().contiguous()
    model = model.double()
    tensors["input.input_ids"] = ids.to(torch.int32)
    tensors["input.attention_mask"] = attn.to(torch.int32)
    tensors["input.token_type_ids"] = token_types.to(torch.int32)
    tensors["input.labels"] = labels.to(torch.int32)

    def loss_fn(m, _):
        out = m(input_ids=ids, attention_mask=attn, token_type_ids=token_types, labels=labels)
        # logits only where a label exists, in row-major order of (batch, position)
        return out.logits[labels != -100], out.loss

    tensors.update(run_mode(model, "train", None, loss_fn))
    path = os.path.join(OUT, "bert_tiny.safetensors")
    save_file(tensors, path)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"{path}: {nparams} parameters, {os.path.getsize(path) / 1e6:.2f} MB")

    base = BertForMaskedLM(BertConfig())
    print(f"BERT-base MLM parameters (tied decoder counted once): "
          f"{sum(p.numel() for p in base.parameters())}")


def main():
    os.makedirs(OUT, exist_ok=True)
    check_against_torchvision()
    resnet_fixture("resnet18_fmnist", 18, 1, 28, True, 1 / 8, 4, seed=18)
    resnet_fixture("resnet50_64", 50, 3, 64, False, 1 / 16, 4, seed=50)
    bert_fixture(seed=7)


if __name__ == "__main__":
    main()
