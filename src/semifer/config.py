"""Typed training configuration.

A config is a tree of dataclasses. ``from_dict`` rejects unknown keys and
wrong types with the dotted path of the offending key, so a typo never silently
falls back to a default. The resolved config is written into the run directory
before the first step.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid."""


@dataclass
class DataConfig:
    """Where images come from. Sources are ``FORMAT:PATH`` strings (``semifer formats``)."""

    # All empty = the embedded synthetic demo faces (labeled / unlabeled / val / test splits).
    # With a labeled source given, nothing synthetic is ever filled in: unlabeled is what is
    # named here (plus the labeled source's rest), and without ``val`` a class-stratified
    # ``val_fraction`` of the labeled source is held out for checkpoint selection (split.json).
    labeled: str = ""
    unlabeled: list[str] = field(default_factory=list)
    val: str = ""
    test: str = ""                   # optional: scored once with the checkpoint selected on val
    val_fraction: float = 0.1
    image_size: int = 48
    channels: int = 3
    # Keep only a class-stratified subset of the labeled source (one of the two, 0 = all).
    labeled_fraction: float = 0.0
    labeled_per_class: int = 0
    split_seed: int = 0
    rest_as_unlabeled: bool = True   # the labeled source's left-out images join the unlabeled set
    # View of the labeled batch: weak = flip + shift (FixMatch's); strong = RandAugment + Cutout
    # on top (for long fully supervised schedules, where a weak view lets the model memorise);
    # reframe = weak + zoom and rotation jitter (a face detector's crop of new photos, no photometric ops)
    labeled_augment: Literal["weak", "strong", "reframe"] = "weak"
    # Random erasing on top of the labeled view: one grey square per face, side uniform in
    # [0, labeled_erase) x the image side (augment.apply_cutout); it hides part of the face so the
    # model cannot lean on one region (Zhong et al. 2020). 0 = off (no random draws either).
    labeled_erase: float = 0.0
    # Where the training crops put the face (faces/align.py FRAMES): predict, prepare and the
    # exported model crop new faces the same way. arcface112 = semifer prepare's aligned crops.
    face_frame: str = "arcface112"
    num_workers: int = 2             # decoding workers for streamed unlabeled sources
    unlabeled_weights: list[float] = field(default_factory=list)  # mixing weights of streamed sources (default equal)
    # Embedded demo data (used by the ``synthetic`` format only).
    synthetic_seed: int = 0
    synthetic_labeled_per_class: int = 25
    synthetic_unlabeled: int = 6000
    synthetic_val_per_class: int = 50
    synthetic_test_per_class: int = 100


@dataclass
class ModelConfig:
    """Backbone and fine-tuning controls (docs/backbones.md)."""

    backbone: str = "small_cnn"     # semifer backbones; tv:NAME / timm:NAME for torchvision / timm models
    backbone_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str = ""            # weights file (.pth/.pt/.safetensors/.dat) or dlib-fr; "" = random init
    pretrained_strict: bool = True  # refuse missing/unexpected weights (false: load what matches, report the rest)
    freeze_stages: int = 0          # freeze the backbone's first N stages (stem = stage 0; -1 = whole backbone)
    freeze_bn: bool = False         # keep every backbone BatchNorm in eval mode with fixed affine parameters
    # In eval mode, average the logits of each face and its mirror image (evaluate, predict, ONNX
    # and the teacher all see it; training steps do not). Costs a second forward at inference.
    mirror_average: bool = False


@dataclass
class SSLConfig:
    """Semi-supervised algorithm and its threshold policy (see docs/method.md)."""

    algorithm: str = "dtm"
    mu: int = 3                    # unlabeled : labeled batch ratio
    lambda_u: float = 1.0          # weight of the unlabeled loss
    tau: float = 0.95              # base confidence threshold
    teacher: Literal["ema", "self"] = "ema"   # who labels the weak view
    ema_decay: float = 0.999
    # FlexMatch / DTM learning status
    status_mode: Literal["auto", "indexed", "streamed"] = "auto"
    status_momentum: float = 0.999  # EMA momentum of per-batch counts (streamed mode)
    threshold_warmup: bool = True   # never-confident samples count in the normaliser
    # DTM only
    tau_min: float = 0.8
    tau_max: float = 0.95
    prior_correction: bool = True   # divide the status by the teacher's predicted class prior
    class_quantile: float = 0.0     # >0: every class accepts at least this share of its predictions (down to quantile_floor)
    quantile_floor: float = 0.5
    quantile_step: float = 0.005    # Robbins-Monro step of the per-class quantile estimate
    # Distribution alignment of the teacher's probabilities to a target prior (auto: the algorithm's
    # default, off for all registered ones; set true where unlabeled and labeled priors match)
    distribution_alignment: bool | Literal["auto"] = "auto"
    alignment_momentum: float = 0.99
    alignment_target: Literal["labeled", "uniform"] = "uniform"   # uniform over labeled classes (macro-F1), or labeled prior
    # Below-threshold pseudo-labels keep a Gaussian weight in the gap to their class threshold,
    # scaled by that class's confidence spread (ssl/softmask.py); off = hard 0/1 mask
    soft_mask: bool = False
    soft_mask_momentum: float = 0.999
    # Adaptive margin (DebiasPL, Wang et al. 2022): the strong-view loss uses logits + m * log(pbar),
    # pbar = the teacher's running mean probability (needs distribution_alignment); 0 = off
    adaptive_margin: float = 0.0
    warmup_steps: int = 0           # supervised-only stage before thresholds are active
    ramp_steps: int = 0             # linear ramp of lambda_u after the warm-up
    # DTM (dtm, dtm_rounds): per-class thresholds holding each class's accepted pseudo-labels at
    # an estimated precision (docs/method.md). The estimate uses probabilities calibrated on a
    # held-out, class-stratified slice of the labeled set (kept out of training).
    holdout_fraction: float = 0.1
    target_precision: float = 0.8   # pi: estimated precision each class's accepted set must reach
    precision_floor: float = 0.5    # no pseudo-label below this calibrated confidence
    # Weight, in faces, of the calibrated precision estimate against the held-out slice's own
    # count of right answers above each threshold (Beta posterior, docs/method.md); 0 = calibration only
    holdout_evidence: float = 0.0
    # "down": the held-out evidence may only lower a class's estimate (a veto where the slice's
    # faces called that class are wrong more often than calibrated), "both": the plain posterior
    holdout_evidence_side: Literal["both", "down"] = "both"
    # dtm_rounds with max_class_share: a class with fewer than k faces in the held-out slice gets
    # its quota scaled by (its held-out faces) / k, since nothing checks its precision estimate. 0 = off
    evidence_quota: int = 0
    # Weight, in held-out faces, of the zero-mean prior on the calibration's per-class biases
    # (docs/method.md): more = per-class biases shrunk harder toward 0 (a rare class's few held-out
    # faces then move its bias less)
    calibration_bias_prior: float = 8.0
    hist_bins: int = 100            # bins of the per-class confidence histogram
    hist_momentum: float = 0.99     # EMA momentum of the histogram (online dtm)
    calib_every: int = 500          # online dtm: re-fit the calibration every N steps
    label_flip: bool = True         # teacher labels = mean of the face's and its mirror image's logits
    # Re-weight calibrated probabilities to the unlabeled faces' class prior (EM, bounded); off:
    # with a weak teacher EM invents a shift where there is none (docs/method.md)
    prior_shift: bool = False
    # dtm_rounds: stage 0 = warmup_steps supervised, then `rounds` equal rounds; each round's
    # teacher labels the unlabeled set once
    rounds: int = 3
    pseudo_targets: Literal["hard", "soft"] = "hard"
    pseudo_sampling: Literal["class_balanced", "uniform"] = "class_balanced"
    max_oversample: float = 10.0    # class_balanced: no face drawn more than k x as often as uniform
    # dtm_rounds: the pseudo-label loss uses logits + log(s_c / pi_c), s = the class mix the round's
    # draws have, pi = the labeled prior (logit adjustment, Menon et al. 2021), so a class the round
    # barely accepts (fear in round 0) is not pushed down by the others' pseudo-labels
    stream_prior_correction: bool = False
    # dtm_rounds: no class accepts more than k x its labeled-prior share of the unlabeled faces
    # (CBST-style quota); where the quota binds, the class's threshold rises to its k pi_c N-th most
    # confident face, so an easy class's threshold follows the teacher instead of sitting at the
    # floor. 0 = off
    max_class_share: float = 0.0
    # dtm_rounds: split the unlabeled faces into `rounds` disjoint random parts; round r's teacher
    # labels only part r (faces it never trained on, where the held-out calibration holds) and the
    # faces accepted in earlier rounds keep their labels. Off: every round relabels every face
    round_partition: bool = False
    # dtm_rounds: the held-out calibration slice joins the labeled set for the last round (its
    # labels were only needed to calibrate; nothing is calibrated after the last round's labels)
    holdout_rejoin: bool = False
    # dtm_rounds: weight of a FixMatch-style consistency term (EMA teacher on the weak view, fixed
    # ssl.tau) on a uniform draw of the unlabeled faces beside the round's accepted ones; the
    # unlabeled batch (mu x batch) is then split half accepted, half uniform. 0 = off
    round_consistency: float = 0.0
    # dtm_rounds with soft targets: each round's calibrated teacher probabilities are averaged with
    # the previous round's targets, q_r = (1 - a) q_r + a q_{r-1} (an ensemble of the round
    # teachers, as temporal ensembling), before thresholds and acceptance. 0 = off
    round_ensemble: float = 0.0
    # dtm_rounds: mixup of the accepted faces with each other and of their targets (Arazo et al.,
    # 2020: mixing keeps a student from fitting its teacher's wrong labels one face at a time).
    # a > 0: each face is mixed with the next face of its batch at lambda = max(l, 1 - l), l ~
    # Beta(a, a). 0 = off
    pseudo_mixup: float = 0.0
    # FreeMatch only
    freematch_momentum: float = 0.999
    # Weight of FreeMatch's self-adaptive fairness loss (sign as published, ssl/losses.py); 0.001 is
    # USB's FreeMatch setting (ent_loss_ratio: 0.001); 0 = FreeMatch without the term
    fairness_weight: float = 0.001


@dataclass
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = 0
    batch_size: int = 32            # labeled images per step (per process)
    grad_clip: float = 0.0          # max global gradient norm; 0 = no clipping
    steps: int = 1000
    imbalance: Literal["none", "logit_adjust", "class_balanced"] = "none"
    label_smoothing: float = 0.0    # of the labeled loss: target (1 - e) one-hot + e / C; 0 = plain CE
    amp: Literal["auto", "bf16", "off"] = "auto"
    # NHWC activations: auto = on whenever bf16 autocast is on (measured +37 % train steps on this
    # 2-core CPU, benchmarks/cpu_precision.py); weights keep their values, only strides change.
    channels_last: bool | Literal["auto"] = "auto"
    max_nonfinite_steps: int = 25   # consecutive skipped (NaN/inf loss or gradient) steps before the run stops
    layer_decay: float = 1.0        # layer-wise LR decay: backbone stage i of K gets lr * layer_decay ** (K - i)
    head_lr: float = 0.0            # learning rate of the classifier head (0 = optim.lr), follows the schedule
    # torch.compile the student and the EMA teacher (in place; off: compiling costs minutes and
    # changes float rounding, so it is a per-run choice; issue 6 measured ~1.3x on an H100).
    compile: bool = False


@dataclass
class RunConfig:
    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    eval_batch_size: int = 512
    progress: bool = True
    threads: int = 0                 # CPU threads for torch; 0 = the allowed CPUs not busy with other work


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_value(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, _path=path)
    if origin is Literal:
        # YAML 1.1 reads an unquoted off/on (e.g. --set optim.amp=off) as a bool: take the word back.
        if isinstance(value, bool) and ("on" if value else "off") in get_args(tp):
            value = "on" if value else "off"
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check_value(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null")
        return None
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (arg,) = get_args(tp)
        return [_check_value(v, arg, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def from_dict(cls: type, data: dict, _path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = _path or cls.__name__
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {k: _check_value(v, hints[k], f"{_path}.{k}" if _path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain-dict form of a config (for YAML/JSON and comparisons)."""
    return dataclasses.asdict(cfg)


def merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "backbone_args":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """``'ssl.tau=0.9'`` -> ``{'ssl': {'tau': 0.9}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> TrainConfig:
    """Defaults <- ``base`` dict <- YAML file at ``path`` <- ``section.key=value`` overrides."""
    data: dict = to_dict(TrainConfig())
    if base:
        data = merge(data, base)
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = merge(data, loaded)
    for o in overrides or []:
        data = merge(data, parse_override(o))
    cfg = from_dict(TrainConfig, data)
    from semifer.faces.align import FRAMES

    if cfg.data.face_frame not in FRAMES:
        raise ConfigError(f"data.face_frame: {cfg.data.face_frame!r} is not a known face frame; known: {sorted(FRAMES)}")
    return resolve_data(cfg)


DEMO_SOURCES = {"labeled": "synthetic:labeled", "unlabeled": ["synthetic:unlabeled"], "val": "synthetic:val",
                "test": "synthetic:test"}


def resolve_data(cfg: TrainConfig) -> TrainConfig:
    """Fill in the embedded demo faces when (and only when) no labeled source is named.

    A run on the user's own labeled data never gets synthetic unlabeled, val or test data
    by default (issue 13): those stay empty and the trainer carves val from the labeled set.
    """
    d = cfg.data
    if not d.labeled:  # demo mode: what is not named comes from the demo faces
        d.labeled = DEMO_SOURCES["labeled"]
        d.unlabeled = d.unlabeled or list(DEMO_SOURCES["unlabeled"])
        d.val = d.val or DEMO_SOURCES["val"]
        d.test = d.test or DEMO_SOURCES["test"]
    if not 0.0 <= d.labeled_erase <= 1.0:
        raise ConfigError(f"data.labeled_erase must be in [0, 1] (the erased square's largest side, a fraction of the image), got {d.labeled_erase}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if not d.val and d.val_fraction <= 0:
        raise ConfigError("no validation data: set data.val (FORMAT:PATH) or data.val_fraction > 0 to hold "
                          "out part of data.labeled")
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
