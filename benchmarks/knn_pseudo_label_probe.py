"""Do neighbours in the teacher's feature space make better pseudo-labels than its softmax? (issue 12 probe)

    python benchmarks/knn_pseudo_label_probe.py RUN/checkpoints/last.pt 1823,1039,1,107,6514,468,2866 [--data ../shared/data]

Takes a 5 %-label run's teacher (EMA weights), embeds the labeled faces, the rest of FER2013 train
(labels hidden) and ``unlabeled_faces/`` (mirror-averaged backbone features), builds a 20-NN cosine
graph and prints, per class (neutral ... surprise), the accuracy of the N_c most confident
FER2013 faces predicted as class c (N_c = the counts given, e.g. what a DTM round accepted) for:
the teacher's softmax; the softmax smoothed over neighbours; label propagation from the labeled
faces (Iscen et al., CVPR 2019: W = D^-1/2 A D^-1/2, A = kNN similarities^3, Z = sum alpha^t W^t Y);
and the mean of softmax and propagation. A print-out for docs/benchmarks.md, not a test.
"""
import argparse, json, time
from pathlib import Path

import torch
import torch.nn.functional as F

from semifer.data.formats import load_source
from semifer.eval.report import load_model

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("checkpoint")
ap.add_argument("counts", help="comma-separated accepted count per class (7)")
ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
a = ap.parse_args()
torch.set_num_threads(1)
counts = [int(x) for x in a.counts.split(",")]
model, cfg, _ = load_model(a.checkpoint)
split = json.loads((Path(a.checkpoint).parents[1] / "split.json").read_text())
fer = load_source(f"folder:{a.data / 'fer2013' / 'train'}", cfg.data)
faces = load_source(f"images:{a.data / 'unlabeled_faces'}", cfg.data)
lab = torch.tensor(split["labeled"])
y_all = torch.as_tensor(fer.labels)
rest = torch.ones(len(y_all), dtype=torch.bool); rest[lab] = False
imgs = torch.cat([fer.images[lab], fer.images[rest], faces.images])
nl, nr = len(lab), int(rest.sum())
t = time.time()
feats, logits = [], []
with torch.inference_mode():
    for i in range(0, len(imgs), 1024):
        x = imgs[i:i + 1024].float() / 255
        f = model.backbone((x - model.mean) / model.std)
        f2 = model.backbone((x.flip(3) - model.mean) / model.std)
        feats.append((f + f2) / 2); logits.append((model.head(f) + model.head(f2)) / 2)
feat = F.normalize(torch.cat(feats), dim=1); logit = torch.cat(logits)[:, :7]
print("features", feat.shape, round(time.time() - t), "s")
p = logit.softmax(1)
yl = y_all[lab]; yr = y_all[rest]
N = len(feat)
# kNN graph
K = 20
idx = torch.empty(N, K, dtype=torch.long); sim = torch.empty(N, K)
for i in range(0, N, 2048):
    s = feat[i:i + 2048] @ feat.T
    s[torch.arange(len(s)), torch.arange(i, i + len(s))] = -1
    v, j = s.topk(K, dim=1); idx[i:i + 2048] = j; sim[i:i + 2048] = v
print("knn", round(time.time() - t), "s")

def prec_at(score, name):
    """per class: among the unlabeled-FER nodes predicted c (argmax score), the counts[c] highest -> accuracy"""
    s = score[nl:nl + nr]; pred = s.argmax(1); conf = s.max(1).values
    out = []
    for c in range(7):
        m = (pred == c).nonzero().squeeze(1)
        k = min(counts[c], len(m))
        if k == 0: out.append(float("nan")); continue
        top = m[conf[m].topk(k).indices]
        out.append((yr[top] == c).float().mean().item())
    print(f"{name:28s}", " ".join(f"{a:.3f}" for a in out), f"| mean {torch.tensor(out).nanmean():.4f}")

prec_at(p, "teacher")
def smooth(q, w_self=0.5, k=K, g=1.0):
    w = sim[:, :k].clamp_min(0) ** g; w = w / w.sum(1, keepdim=True)
    return w_self * q + (1 - w_self) * (w[:, :, None] * q[idx[:, :k]]).sum(1)
for ws in (0.5, 0.3):
    for k in (10, 20):
        prec_at(smooth(p, ws, k), f"smooth self{ws} k{k}")
q = p
for it in range(3):
    q = smooth(q, 0.5, 10)
prec_at(q, "smooth x3 k10")
# label propagation (Iscen 2019) from labeled seeds
A = torch.sparse_coo_tensor(torch.stack([torch.arange(N).repeat_interleave(K), idx.reshape(-1)]),
                            (sim.clamp_min(0) ** 3).reshape(-1), (N, N)).coalesce()
A = (A + A.t()).coalesce()
d = torch.sparse.sum(A, 1).to_dense().clamp_min(1e-8) ** -0.5
vals = A.values() * d[A.indices()[0]] * d[A.indices()[1]]
W = torch.sparse_coo_tensor(A.indices(), vals, (N, N)).coalesce()
Y = torch.zeros(N, 7)
Y[torch.arange(nl), yl] = 1.0
Y[:nl] /= torch.bincount(yl, minlength=7)[yl].float()[:, None]
for alpha in (0.9, 0.99):
    Z = Y.clone()
    for it in range(20):
        Z = alpha * torch.sparse.mm(W, Z) + Y
    Zn = F.normalize(Z.clamp_min(0), p=1, dim=1)
    prec_at(Zn, f"LP alpha{alpha}")
    prec_at(0.5 * p + 0.5 * Zn, f"teacher+LP alpha{alpha}")
print("done", round(time.time() - t), "s")
