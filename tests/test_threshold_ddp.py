"""Threshold state under DDP (2 CPU processes, gloo): identical on every rank, equal to 1 process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semifer.registry import THRESHOLDS
from semifer.ssl.softmask import SoftMask

C, N, B = 4, 16, 4


class SoftMaskOnProbs(SoftMask):
    """SoftMask fed like a policy: update(probs, index)."""

    def update(self, probs, index=None):
        conf, pred = probs.max(dim=1)
        super().update(conf, pred)


def make_policies():
    return {
        "dtm_flex_indexed": THRESHOLDS.get("dtm_flex")(C, tau=0.6, mode="indexed", num_samples=N, momentum=0.5),
        "dtm_flex_streamed": THRESHOLDS.get("dtm_flex")(C, tau=0.6, mode="streamed", momentum=0.5),
        "flex_indexed": THRESHOLDS.get("flexmatch")(C, tau=0.6, mode="indexed", num_samples=N),
        "freematch": THRESHOLDS.get("freematch")(C, momentum=0.5),
        "soft_mask": SoftMaskOnProbs(C, momentum=0.5),
        "dtm_flex_quantile": THRESHOLDS.get("dtm_flex")(C, tau=0.6, tau_min=0.5, mode="streamed", momentum=0.5,
                                                        class_quantile=0.3, quantile_floor=0.2, quantile_step=0.1),
        # The precision-target DTM: batch histograms are all-reduced (bins 10 so a few samples fill them).
        "dtm": THRESHOLDS.get("dtm")(C, target=0.6, floor=0.3, bins=10, momentum=0.5),
    }


def batches(steps=3):
    """Global batches (2B samples, distinct indices) shared by both processes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        probs = torch.softmax(3 * torch.randn(2 * B, C, generator=g), dim=1)
        out.append((probs, torch.randperm(N, generator=g)[:2 * B]))
    return out


def _worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    pols = make_policies()
    for probs, idx in batches():
        sl = slice(rank * B, (rank + 1) * B)  # each rank sees its half of the global batch
        for p in pols.values():
            p.update(probs[sl], idx[sl])
    # Plain lists: tensors sent through a queue share file descriptors that die with the process.
    q.put((rank, {k: {n: t.tolist() for n, t in p.state_dict().items()} for k, p in pols.items()}))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_threshold_buffers_identical_across_ranks_and_equal_single_process():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    states = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = make_policies()
    for probs, idx in batches():
        for p in single.values():
            p.update(probs, idx)
    for name, pol in single.items():
        for buf, ref in pol.state_dict().items():
            a, b = torch.tensor(states[0][name][buf]), torch.tensor(states[1][name][buf])
            # NaN marks "not measured yet" (dtm.holdout_precision): equal where both are NaN.
            assert a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()), \
                f"{name}.{buf} differs between ranks"
            assert torch.allclose(a.float(), ref.float(), atol=1e-6, equal_nan=True), f"{name}.{buf} differs from 1 process"
