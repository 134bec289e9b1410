"""Train-step throughput of a backbone in fp32 vs bf16 autocast (and channels_last), on this machine.

    python benchmarks/cpu_precision.py [--backbone small_cnn] [--width 16] [--size 48] [--batch 224] [--steps 10]

Prints a table of images/s; a script, not a test. Random tensors, SGD, no data loading.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from semifer.models.classifier import Classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--batch", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    kwargs = {"width": a.width} if a.backbone == "small_cnn" else {}
    x = torch.rand(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 8, (a.batch,))
    print(f"| {a.backbone} {a.size}px batch {a.batch} | img/s |\n|---|---:|")
    for amp in (False, True):
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = Classifier(a.backbone, 8, **kwargs)
            xx = x
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                xx = x.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for i in range(a.steps + 3):
                if i == 3:
                    t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(model(xx), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            rate = a.steps * a.batch / (time.perf_counter() - t0)
            print(f"| {'bf16' if amp else 'fp32'}{', channels_last' if channels_last else ''} | {rate:.0f} |")


if __name__ == "__main__":
    main()
