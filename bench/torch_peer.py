#!/usr/bin/python3
"""PyTorch peer of bench/train_step.ts: the same model spec, batch and thread count.

    /usr/bin/python3 bench/torch_peer.py --spec "$(bun bench/train_step.ts --spec-json --models baseline)" \
        --threads 1 [--steps 10] [--warmup 3] [--serve] [--channels-last]

Debian's python3-torch (1.13, CPU) is the reference: if `import torch` fails, bench/compare.ts
installs it with `apt-get update && apt-get install -y python3-torch` and runs this file with
/usr/bin/python3 (a pyenv python3 earlier on PATH does not see Debian's dist-packages).

The model follows the ModelSpec exactly: convs without bias and 'same' padding (k // 2 on each
side; for the stride-2 3x3 stem TF pads 0/1 instead of 1/1: same output shape and FLOPs),
batchnorm (eps 1e-3), relu, 2x2 max pool, depthwise convs as groups=channels, global average
pool, dense + relu, a class head (cross-entropy) and a 1-unit regression head (MSE), summed, Adam.
Tensors are NCHW (PyTorch's default layout, what a user gets) unless --channels-last.

--features B times torchvision's MobileNetV2 (random weights, eval mode, no_grad) instead: the
forward pass of B images at --size (224) up to the globally pooled 1280-d features, the peer of
bench/features.ts (our nsfwjs MobileNetV2 backbone). Needs Debian's python3-torchvision.

--serve speaks the line protocol of train_step.ts --serve on stdin/stdout:
"run K" -> "ms t1 ... tK" (wall ms of each full step), "quit".
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    def __init__(self, spec):
        super().__init__()
        layers = []
        c = 3
        for l in spec["layers"]:
            t = l["type"]
            if t == "conv":
                k = l["kernel"]
                layers.append(nn.Conv2d(c, l["filters"], k, stride=l["stride"], padding=k // 2, bias=False))
                c = l["filters"]
            elif t == "dwconv":
                k = l["kernel"]
                layers.append(nn.Conv2d(c, c, k, stride=l["stride"], padding=k // 2, groups=c, bias=False))
            elif t == "bn":
                layers.append(nn.BatchNorm2d(c, eps=1e-3, momentum=0.01))
            elif t == "relu":
                layers.append(nn.ReLU())
            elif t == "maxpool":
                layers.append(nn.MaxPool2d(l["size"]))
            else:
                raise ValueError(f"unknown layer type {t}")
        self.body = nn.Sequential(*layers)
        self.dense = nn.Linear(c, spec["dense"])
        self.cls = nn.Linear(spec["dense"], spec["classes"])
        self.reg = nn.Linear(spec["dense"], 1)

    def forward(self, x):
        h = self.body(x).mean(dim=(2, 3))
        h = F.relu(self.dense(h))
        return self.cls(h), self.reg(h)


def make_step(spec, channels_last):
    torch.manual_seed(0)
    model = Net(spec)
    x = torch.rand(spec["batch"], 3, spec["size"], spec["size"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y_cls = torch.arange(spec["batch"]) % spec["classes"]
    y_reg = torch.randn(spec["batch"], 1)
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        logits, reg = model(x)
        loss = F.cross_entropy(logits, y_cls) + F.mse_loss(reg, y_reg)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_features(batch, size, channels_last):
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.rand(batch, 3, size, size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.no_grad():
            f = F.adaptive_avg_pool2d(model.features(x), 1).flatten(1)
        return float(f[0, 0])

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=0, help="batch size: time MobileNetV2 features instead")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--spec", default=None, help="ModelSpec JSON (bun bench/train_step.ts --spec-json --models NAME)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    if a.features <= 0 and a.spec is None:
        ap.error("--spec is required (or --features B)")
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if a.features > 0:
        step = make_features(a.features, a.size, a.channels_last)
        spec = {"name": "mobilenet_v2_features", "batch": a.features, "size": a.size}
    else:
        spec = json.loads(a.spec)
        step = make_step(spec, a.channels_last)
    for _ in range(1 + a.warmup):
        step()
    label = f"torch {torch.__version__} (threads: {torch.get_num_threads()}{', channels_last' if a.channels_last else ''})"
    if a.serve:
        print(f"ready {label}", flush=True)
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "run":
                k = max(1, int(parts[1]) if len(parts) > 1 else 1)
                ms = []
                for _ in range(k):
                    t0 = time.perf_counter()
                    step()
                    ms.append((time.perf_counter() - t0) * 1000)
                print("ms " + " ".join(f"{m:.2f}" for m in ms), flush=True)
            elif parts[0] == "quit":
                break
            else:
                print(f"error unknown command {parts[0]}", flush=True)
        return
    ms = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t0) * 1000)
    ms.sort()
    med = ms[len(ms) // 2]
    kind = "features" if a.features > 0 else "train_step"
    print(f"{kind} model={spec['name']} backend=torch batch={spec['batch']} size={spec['size']} "
          f"ms_per_step={med:.1f} images_per_s={spec['batch'] * 1000 / med:.1f}  ({label}; ms min {ms[0]:.0f} max {ms[-1]:.0f})")


if __name__ == "__main__":
    main()
