"""Train-step img/s of dlib_resnet34 (pooled, gray, batch 32, bf16 autocast on CPU) at 48, 64 and 96 px.

    python benchmarks/dlib_speed.py
"""
import time

import torch

import semifer  # noqa: F401
from semifer.models import Classifier
torch.manual_seed(0)
for size in (48, 64, 96):
    m = Classifier("dlib_resnet34", 8, in_chans=1, output="pooled").train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(32, 1, size, size), torch.randint(0, 8, (32,))
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 6.5:
        step(); n += 1
    dt = time.perf_counter() - t0
    print(f"{size} px: {n * 32 / dt:.1f} img/s ({n} steps in {dt:.1f} s)", flush=True)
