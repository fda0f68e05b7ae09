"""Train and evaluate models on labelled chips: classifiers (calibrated), regressions and segmenters.

The held-out split is by cell, not by building: neighbouring buildings share
lighting, roof colours and imagery vintage, so a random split would report an
accuracy the model won't have on a new area.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ops.ml.calibration import Calibration, calibrate
from ops.ml.card import ModelCard
from ops.ml.inference import reuse_freed_memory
from ops.ml.nets import TASK_OF_ARCHITECTURE, PanelNet, RoofNet, ValueNet
from ops.ml.regression_metrics import regression_metrics


@dataclass
class TrainConfig:
    epochs: int = 24
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    seed: int = 0
    widths: tuple[int, ...] | None = None  # default: the architecture's own
    max_train_seconds: float = 600.0


@dataclass
class TrainResult:
    model: nn.Module
    card: ModelCard
    confusion: np.ndarray | None  # [true, predicted] on the held-out split (not for a regression)
    history: list[dict]
    calibration: Calibration | None = None  # classification
    held_out: tuple[np.ndarray, np.ndarray] | None = None  # regression: (true, predicted) values of the held-out split


def split_by_group(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out samples: whole groups (cells) chosen by a seeded hash.

    Falls back to a per-sample split when there are too few groups to hold
    out a fraction of them.
    """
    uniq = sorted(set(groups.tolist()))
    if len(uniq) >= 5:
        score = {g: int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for g in uniq}
        val = np.array([score[g] < val_fraction for g in groups.tolist()])
        if 0 < val.sum() < len(val):
            return val
    rng = np.random.default_rng(seed)
    return rng.random(len(groups)) < val_fraction


def channel_stats(chips: np.ndarray, n: int = 2048) -> tuple[list[float], list[float]]:
    """Per-band mean and std in 0..1 of the first ``n`` chips: the normalisation saved with the model."""
    flat = chips[:n].reshape(-1, chips.shape[1], chips.shape[-2] * chips.shape[-1])
    return (flat.mean(axis=(0, 2)) / 255.0).tolist(), (flat.std(axis=(0, 2)) / 255.0 + 1e-3).tolist()


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Roof types don't change under flips and quarter turns."""
    if torch.rand(()) < 0.5:
        x = x.flip(3)
    if torch.rand(()) < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, ()))
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def metrics_from_confusion(cm: np.ndarray, classes: list[str]) -> dict:
    total = cm.sum()
    acc = float(np.trace(cm) / total) if total else 0.0
    f1s = {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        p = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp / cm[i, :].sum() if cm[i, :].sum() else 0.0
        f1s[c] = float(2 * p * r / (p + r)) if p + r else 0.0
    counts = cm.sum(axis=1)
    return {
        "accuracy": acc,
        "macro_f1": float(np.mean(list(f1s.values()))) if f1s else 0.0,
        "f1": f1s,
        "chance_accuracy": float(counts.max() / total) if total else 0.0,  # always predicting the majority class
        "n_val": int(total),
    }


@torch.no_grad()
@torch.inference_mode()  # no autograd graph: the held-out pass after each epoch would hold one per batch
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    dev = next(model.parameters()).device
    out = [
        model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(dev)).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype="float32")


def _fit(
    model: nn.Module,
    loss_fn: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    held_out: Callable[[], tuple[str, float]],
    log: Callable[[str], None],
    target: str = "int64",
) -> tuple[list[dict], float]:
    """AdamW with a one-cycle schedule over shuffled mini-batches, within the time budget.

    Trains on CUDA when there is one (the GPU pods of production), on CPU otherwise.
    Returns the per-epoch history and the start time; the model is left in eval mode.
    """
    reuse_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loss_fn.to(device)  # activations and gradients are re-allocated every step: keep them off mmap
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * int(np.ceil(len(x) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    x_t = torch.from_numpy(np.ascontiguousarray(x))
    y_t = torch.from_numpy(y.astype(target))
    history = []
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_t), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:
                continue
            xb, yb = augment(x_t[idx], y_t[idx])
            loss = loss_fn(model(xb.to(device, non_blocking=True)), yb.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        name, value = held_out()
        train_loss = total / max(len(x), 1)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, f"val_{name.lower()}": value})
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.3f}, held-out {name} {value:.3f}")
        if time.perf_counter() - t0 > cfg.max_train_seconds:
            log(f"stopping early: {cfg.max_train_seconds:.0f} s training budget spent")
            break
    model.eval()
    return history, t0


def _card(
    name: str,
    architecture: str,
    classes: list[str],
    chips: np.ndarray,
    norm: tuple[list[float], list[float]],
    widths: list[int],
    metrics: dict,
    **extra,
) -> ModelCard:
    """The card of a model trained on ``chips``: task from its architecture, what it expects, its metrics."""
    return ModelCard(
        name=name,
        task=TASK_OF_ARCHITECTURE[architecture],
        classes=list(classes),
        input_size=int(chips.shape[-1]),
        bands=int(chips.shape[1]),
        mean=norm[0],
        std=norm[1],
        architecture=architecture,
        widths=widths,
        metrics=metrics,
        **extra,
    )


def _held_out_split(
    chips: np.ndarray, targets: np.ndarray, groups: np.ndarray, cfg: TrainConfig, name: str, what: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked inputs split by cell: (held-out mask, train chips, train targets, held-out chips, held-out targets)."""
    if not (len(chips) == len(targets) == len(groups)):
        raise ValueError(f"chips, {what} and groups must have the same length")
    if len(chips) < 10:
        raise ValueError(f"only {len(chips)} labelled chips: too few to train {name}")
    torch.manual_seed(cfg.seed)
    val = split_by_group(groups, cfg.val_fraction, cfg.seed)
    return val, chips[~val], targets[~val], chips[val], targets[val]


def train_classifier(
    chips: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    groups: np.ndarray,
    *,
    name: str = "roof_type",
    config: TrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on uint8 ``chips`` (N, 3, S, S) with integer ``labels`` indexing ``classes``."""
    cfg = config or TrainConfig()
    val, xtr, ytr, xva, yva = _held_out_split(chips, labels, groups, cfg, name, "labels")
    mean, std = channel_stats(chips)
    widths = list(cfg.widths or (16, 32, 64, 128))
    model = RoofNet(len(classes), mean, std, widths)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)

    def held_out() -> tuple[str, float]:
        pred = predict_logits(model, xva).argmax(1) if len(xva) else np.array([])
        return "accuracy", float((pred == yva).mean()) if len(xva) else float("nan")

    history, t0 = _fit(model, loss_fn, xtr, ytr, cfg, lambda x, y: (_augment(x), y), held_out, log)
    model.eval()
    logits = predict_logits(model, xva)
    pred = logits.argmax(1)
    cm = np.zeros((len(classes), len(classes)), dtype="int64")
    np.add.at(cm, (yva.astype("int64"), pred.astype("int64")), 1)
    metrics = metrics_from_confusion(cm, classes)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["n_train"] = int(len(xtr))
    # scores that mean what they say: a temperature fitted on the held-out split (the argmax, so the metrics, stay)
    cal = calibrate(logits, yva, groups[val], seed=cfg.seed) if len(xva) else None
    if cal is not None:
        model.temperature.fill_(cal.temperature)
        log(f"calibration: temperature {cal.temperature:.3f}, held-out ECE {cal.ece_before:.3f} → {cal.ece_after:.3f}")
    card = _card(
        name,
        "RoofNet",
        classes,
        chips,
        (mean, std),
        widths,
        metrics,
        calibration=cal.to_card() if cal is not None else {},
    )
    return TrainResult(model=model, card=card, confusion=cm, history=history, calibration=cal)


# --- regression ----------------------------------------------------------------


@torch.no_grad()
@torch.inference_mode()
def predict_values(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """A regression's values for uint8 chips, (N,) float64 in the declared unit."""
    out = predict_logits(model, x, batch_size)
    return out.reshape(-1).astype("float64") if out.size else np.zeros(0)


def train_regressor(
    chips: np.ndarray,
    values: np.ndarray,
    groups: np.ndarray,
    *,
    name: str,
    unit: str,
    value_range: tuple[float, float] | None = None,
    config: TrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a one-value network on uint8 ``chips`` (N, 3, S, S) and float ``values`` in ``unit``.

    ``value_range``: the values the quantity can take; labels outside it are an
    error, predictions are clipped to it (recorded in the card's post-processing,
    applied by ``ops.ml.postprocess``; the held-out metrics are of clipped values).

    The loss is the Smooth L1 loss of the standardised value (a few wrong
    labels weigh less than under a squared error); the held-out metrics compare
    with always predicting the training mean, the baseline a regression must beat.
    """
    cfg = config or TrainConfig()
    values = np.asarray(values, dtype="float64")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: {int((~np.isfinite(values)).sum())} label value(s) are not finite numbers")
    if value_range is not None and ((values < value_range[0]) | (values > value_range[1])).any():
        out = values[(values < value_range[0]) | (values > value_range[1])]
        raise ValueError(
            f"{name}: {len(out)} label value(s) outside the declared range {list(value_range)}, e.g. {out[:5].tolist()}"
        )
    _, xtr, ytr, xva, yva = _held_out_split(chips, values, groups, cfg, name, "values")
    mean, std = channel_stats(chips)
    widths = list(cfg.widths or (16, 32, 64, 128))
    model = ValueNet(1, mean, std, widths)
    t_mean, t_std = float(ytr.mean()), float(ytr.std() or 1.0)
    model.target_mean.fill_(t_mean)
    model.target_std.fill_(t_std)
    smooth_l1 = nn.SmoothL1Loss()

    class Loss(nn.Module):
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return smooth_l1((out.squeeze(1) - t_mean) / t_std, (y - t_mean) / t_std)

    def held_out() -> tuple[str, float]:
        if not len(xva):
            return "MAE", float("nan")
        return "MAE", float(np.abs(predict_values(model, xva) - yva).mean())

    history, t0 = _fit(
        model, Loss(), xtr, ytr.astype("float32"), cfg, lambda x, y: (_augment(x), y), held_out, log, target="float32"
    )
    pred = predict_values(model, xva)
    if value_range is not None:
        pred = np.clip(pred, *value_range)
    metrics = regression_metrics(yva, pred, t_mean)
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["n_train"] = int(len(xtr))
    metrics["train_range"] = [float(ytr.min()), float(ytr.max())]
    card = _card(
        name,
        "ValueNet",
        [],
        chips,
        (mean, std),
        widths,
        metrics,
        unit=unit,
        postprocess={"range": list(value_range)} if value_range is not None else {},
    )
    return TrainResult(model=model, card=card, confusion=None, history=history, held_out=(yva, pred))


# --- segmentation --------------------------------------------------------------


def _augment_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same flips and quarter turn on chips (N, C, S, S) and their masks (N, S, S)."""
    if torch.rand(()) < 0.5:
        x, y = x.flip(3), y.flip(2)
    if torch.rand(()) < 0.5:
        x, y = x.flip(2), y.flip(1)
    k = int(torch.randint(0, 4, ()))
    return (torch.rot90(x, k, dims=(2, 3)), torch.rot90(y, k, dims=(1, 2))) if k else (x, y)


def segmentation_metrics(cm: np.ndarray, classes: list[str]) -> dict:
    """Pixel accuracy, macro-F1 over pixel classes, and IoU of every class but the first (the background)."""
    m = metrics_from_confusion(cm, classes)
    ious = {}
    for i, c in enumerate(classes):
        tp = cm[i, i]
        denom = cm[i, :].sum() + cm[:, i].sum() - tp
        ious[c] = float(tp / denom) if denom else 1.0
    m["iou_per_class"] = ious
    m["iou"] = float(np.mean([ious[c] for c in classes[1:]])) if len(classes) > 1 else ious[classes[0]]
    m["n_val_pixels"] = m.pop("n_val")
    return m


@torch.no_grad()
@torch.inference_mode()
def predict_masks(model: nn.Module, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Argmax class per pixel, (N, S, S) uint8."""
    model.eval()
    dev = next(model.parameters()).device
    out = [
        model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(dev)).argmax(1).to(torch.uint8).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0,) + x.shape[-2:], dtype="uint8")


def train_segmenter(
    chips: np.ndarray,
    masks: np.ndarray,
    classes: list[str],
    groups: np.ndarray,
    *,
    name: str = "solar_panels",
    config: TrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a per-pixel classifier on uint8 ``chips`` (N, 3, S, S) and class-index ``masks`` (N, S, S).

    Panels cover a few percent of the pixels: the loss is cross-entropy with
    the rare classes weighted up (square root of the imbalance, at most 10×),
    so the model does not settle for predicting background everywhere.
    """
    cfg = config or TrainConfig()
    _, xtr, ytr, xva, yva = _held_out_split(chips, masks, groups, cfg, name, "masks")
    mean, std = channel_stats(chips)
    widths = list(cfg.widths or (16, 32, 64))
    model = PanelNet(len(classes), mean, std, widths)
    counts = np.bincount(ytr.reshape(-1), minlength=len(classes)).astype("float64")
    weight = np.clip(np.sqrt(counts.max() / np.maximum(counts, 1)), 1.0, 10.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32))

    def held_out() -> tuple[str, float]:
        if not len(xva):
            return "IoU", float("nan")
        pred = predict_masks(model, xva)
        return "IoU", float(np.logical_and(pred > 0, yva > 0).sum() / max(np.logical_or(pred > 0, yva > 0).sum(), 1))

    history, t0 = _fit(model, loss_fn, xtr, ytr, cfg, _augment_pair, held_out, log)
    pred = predict_masks(model, xva)
    cm = np.zeros((len(classes), len(classes)), dtype="int64")
    np.add.at(cm, (yva.reshape(-1).astype("int64"), pred.reshape(-1).astype("int64")), 1)
    metrics = segmentation_metrics(cm, classes)
    # per building: does the chip hold any panel pixel, predicted vs true
    has_t, has_p = (yva > 0).reshape(len(yva), -1).any(1), (pred > 0).reshape(len(pred), -1).any(1)
    metrics["chip_detection_accuracy"] = float((has_t == has_p).mean()) if len(yva) else 0.0
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["n_train"] = int(len(xtr))
    metrics["n_val"] = int(len(xva))
    card = _card(
        name,
        "PanelNet",
        classes,
        chips,
        (mean, std),
        widths,
        metrics,
        postprocess={"threshold": 0.5, "min_area_px": 4, "clip_buffer_m": 0.5},
    )
    return TrainResult(model=model, card=card, confusion=cm, history=history)
