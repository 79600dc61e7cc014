"""Training robust models: standard, PGD-AT, TRADES, AMO and AMO-PGD.

Methods (``method=``):

- ``standard``: cross-entropy on clean inputs.
- ``pgd-at``: Madry et al. (ICLR 2018): cross-entropy on PGD-k adversarial examples.
- ``trades``: Zhang et al. (ICML 2019): CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximizing the
  KL term within eps.
- ``amo``: all-layer margin optimization (Wei & Ma, ICLR 2020). Per batch, delta = 0, then t
  ascent steps delta <- (1 - eta * lambda) * delta + eta * grad_delta sum_n loss_n, then a weight
  step on CE(F(x, delta), y) with delta held fixed.
- ``amo-pgd``: the robust all-layer margin: a PGD example x' first, then AMO at x'. Two forms
  (``amo_form=``): ``plain`` runs PGD-k, then the AMO ascent at x' (k + 2 forward-backward
  passes with the weight step); ``fused`` (the default) runs the last PGD step with zero
  all-layer deltas in the graph, so that one backward pass gives both the input step and the
  first AMO ascent step (k + 1 passes, the cost of ``pgd-at``). The fused form takes its
  hidden-layer gradients at the PGD iterate before the last step, not at x' itself.

Choices made on purpose (the paper leaves them open):

- The ascent loss is the *sum* over the batch, so each example's delta step does not shrink with
  the batch size. The released code takes the batch mean with SGD learning rate 0.01 at batch
  128, which is eta = 0.01 / 128 ~= 7.8e-5 here.
- Attack and ascent passes run in train mode (batch statistics, as the weight step sees) but
  leave BatchNorm running statistics untouched: only the weight step's pass updates them.
- The weight step trains on the perturbed loss only, as the paper does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robustbench_alm.attacks import Budget, ascent_direction, pgd, project, resolve_step_size
from robustbench_alm.data import load_dataset
from robustbench_alm.models import create_model
from robustbench_alm.perturbation import SCALES, all_layer_forward
from robustbench_alm.threat import Dataset, ThreatModel, check_eps

__all__ = ["TrainConfig", "METHODS", "train", "amo_perturbation", "fused_amo_pgd",
           "method_loss", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

METHODS = ("standard", "pgd-at", "trades", "amo", "amo-pgd")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "multistep")
AMO_FORMS = ("fused", "plain")


@dataclass
class TrainConfig:
    """Every hyperparameter of a training run; saved in the checkpoint's model card."""

    method: str = "standard"
    architecture: str = "cnn-small"
    dataset: str = "fashion-mnist"
    epochs: int = 5
    batch_size: int = 128
    train_subset: int | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.2
    augment: bool = False
    threat_model: str = "Linf"
    eps: float = 0.1
    eps_warmup_epochs: float = 0.0
    pgd_steps: int = 7
    pgd_step_size: float | str | None = None
    trades_beta: float = 6.0
    amo_steps: int = 1
    amo_eta: float = 0.002
    amo_lambda: float = 0.0
    amo_form: str = "fused"
    delta_scale: str = "input"
    seed: int = 0
    device: str = "cpu"
    #: Stop after this many weight steps in all (smoke tests of long configurations); None runs
    #: every epoch. The schedules still follow ``epochs``, as in the full run.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("delta_scale", self.delta_scale, SCALES)
        _check_choice("amo_form", self.amo_form, AMO_FORMS)
        Dataset.parse(self.dataset)
        check_eps(self.eps, ThreatModel.parse(self.threat_model))
        for name in ("epochs", "batch_size", "pgd_steps", "amo_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name.endswith("steps") else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool)
                                           or not isinstance(self.max_steps, int)
                                           or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got "
                             f"{self.max_steps!r}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"train_subset must be >= 1, got {self.train_subset!r}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.method in ("pgd-at", "trades", "amo-pgd") and self.pgd_steps < 1:
            raise ValueError(f"{self.method} needs pgd_steps >= 1, got {self.pgd_steps}")
        if self.method in ("amo", "amo-pgd") and self.amo_steps < 1:
            raise ValueError(f"{self.method} needs amo_steps >= 1, got {self.amo_steps}")
        for name, low, strict in (("trades_beta", 0.0, False), ("amo_eta", 0.0, True),
                                  ("amo_lambda", 0.0, False), ("eps_warmup_epochs", 0.0, False),
                                  ("weight_decay", 0.0, False), ("momentum", 0.0, False)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (strict and value == low):
                relation = ">" if strict else ">="
                raise ValueError(f"{name} must be a finite number {relation} {low:g}, "
                                 f"got {value!r}")
        if self.milestones and self.lr_schedule != "multistep":
            raise ValueError(f"milestones {list(self.milestones)} only apply to "
                             "lr_schedule='multistep'")
        bad = [m for m in self.milestones if not 0 < int(m) <= self.epochs]
        if bad:
            raise ValueError(f"milestones must be epochs in 1..{self.epochs}, got {bad}")
        self.step_size(self.eps)  # fails early on an unreadable step size
        self.milestones = tuple(int(m) for m in self.milestones)

    def step_size(self, eps: float) -> float:
        """The PGD step at ``eps``; by default 2.5 * eps / steps (Madry et al.)."""
        if self.pgd_step_size is None:
            return 2.5 * eps / max(self.pgd_steps, 1)
        return resolve_step_size(self.pgd_step_size, eps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(accepted)}")


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module):
    """Run passes in the current mode while leaving BatchNorm running statistics unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    try:
        yield
    finally:
        for module, state in zip(norms, saved):
            module.load_state_dict(state)


def amo_perturbation(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                     eta: float, lam: float = 0.0, scale: str = "input",
                     deltas: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The AMO all-layer perturbation of a batch: ``steps`` ascent steps on the summed CE.

    Args:
        deltas: where the ascent starts (default: zero deltas, created by the first pass).

    Returns:
        Detached deltas, one per perturbation point (zeros when ``steps == 0``).
    """
    deltas = {k: d.detach().requires_grad_(True) for k, d in (deltas or {}).items()}
    with torch.enable_grad():
        logits = all_layer_forward(model, x, deltas, scale=scale)
        for step in range(steps):
            loss = F.cross_entropy(logits, y, reduction="sum")
            grads = torch.autograd.grad(loss, list(deltas.values()))
            deltas = _ascend(deltas, grads, eta, lam)
            if step + 1 < steps:
                logits = all_layer_forward(model, x, deltas, scale=scale)
    return {name: d.detach() for name, d in deltas.items()}


def _ascend(deltas, grads, eta: float, lam: float) -> dict[str, torch.Tensor]:
    """One AMO ascent step: delta <- (1 - eta * lambda) * delta + eta * grad."""
    return {name: ((1 - eta * lam) * d + eta * g).detach().requires_grad_(True)
            for (name, d), g in zip(deltas.items(), grads)}


def fused_amo_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: Budget, *,
                  pgd_steps: int, step_size: float, amo_steps: int, eta: float,
                  lam: float = 0.0, scale: str = "input", generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PGD example and the AMO perturbation at the cost of the PGD example alone.

    PGD runs ``pgd_steps - 1`` steps as usual; the last one runs with zero deltas at every
    perturbation point, so its backward pass gives the input gradient (for the last PGD step)
    and the delta gradients (for the first AMO ascent step) together. Further ascent steps, if
    ``amo_steps > 1``, run at the final PGD example as in the plain form.

    Returns:
        The PGD example x' and the deltas, both detached.
    """
    x_adv = pgd(model, x, y, budget, steps=pgd_steps - 1, step_size=step_size,
                random_start=True, generator=generator, keep_best=False)
    x_adv.requires_grad_(True)
    deltas: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        logits = all_layer_forward(model, x_adv, deltas, scale=scale)
        loss = F.cross_entropy(logits, y, reduction="sum")
        grad_x, *grads = torch.autograd.grad(loss, [x_adv, *deltas.values()])
    x_adv = project(x_adv.detach() + step_size * ascent_direction(grad_x, budget.threat_model),
                    x, budget)
    deltas = _ascend(deltas, grads, eta, lam)
    if amo_steps > 1:
        deltas = amo_perturbation(model, x_adv, y, steps=amo_steps - 1, eta=eta, lam=lam,
                                  scale=scale, deltas=deltas)
    return x_adv, {name: d.detach() for name, d in deltas.items()}


def _trades_example(model, x, budget: Budget, steps: int, step_size: float,
                    gen: torch.Generator) -> torch.Tensor:
    """The TRADES inner maximization: ascend KL(f(x) || f(x')) from a tiny Gaussian start."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            grad, = torch.autograd.grad(kl, x_adv)
        x_adv = project(x_adv.detach() + step_size * ascent_direction(grad, budget.threat_model),
                        x, budget)
    return x_adv.detach()


def method_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                gen: torch.Generator, eps: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of ``cfg.method`` on one batch, and the logits it was computed on.

    ``eps`` overrides ``cfg.eps`` (for warm-up). Model in train mode; attack and ascent passes
    leave BatchNorm running statistics unchanged.
    """
    budget = Budget(ThreatModel.parse(cfg.threat_model), cfg.eps if eps is None else eps)
    step = cfg.step_size(budget.eps)
    if cfg.method == "standard":
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    if cfg.method == "trades":
        with frozen_norm_stats(model):
            x_adv = _trades_example(model, x, budget, cfg.pgd_steps, step, gen)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                      reduction="batchmean")
        return F.cross_entropy(logits, y) + cfg.trades_beta * kl, logits

    if cfg.method == "amo-pgd" and cfg.amo_form == "fused":
        with frozen_norm_stats(model):
            x, deltas = fused_amo_pgd(model, x, y, budget, pgd_steps=cfg.pgd_steps,
                                      step_size=step, amo_steps=cfg.amo_steps,
                                      eta=cfg.amo_eta, lam=cfg.amo_lambda,
                                      scale=cfg.delta_scale, generator=gen)
        logits = all_layer_forward(model, x, deltas, scale=cfg.delta_scale)
        return F.cross_entropy(logits, y), logits

    if cfg.method in ("pgd-at", "amo-pgd"):
        with frozen_norm_stats(model):
            x = pgd(model, x, y, budget, steps=cfg.pgd_steps, step_size=step,
                    random_start=True, generator=gen, keep_best=False)
    if cfg.method == "pgd-at":
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    with frozen_norm_stats(model):
        deltas = amo_perturbation(model, x, y, steps=cfg.amo_steps, eta=cfg.amo_eta,
                                  lam=cfg.amo_lambda, scale=cfg.delta_scale)
    logits = all_layer_forward(model, x, deltas, scale=cfg.delta_scale)
    return F.cross_entropy(logits, y), logits


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate after ``progress`` epochs (fractional)."""
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress / cfg.epochs))
    if cfg.lr_schedule == "multistep":
        return cfg.lr * cfg.lr_gamma ** sum(progress >= m for m in cfg.milestones)
    return cfg.lr


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad-4 random crop and horizontal flip, per example."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (b,), generator=gen, device=x.device)
    dx = torch.randint(0, 9, (b,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[idx, chan, rows, cols]
    flip = torch.rand(b, generator=gen, device=x.device) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(cfg: TrainConfig, *, data_dir: str | Path | None = None,
          data: tuple[torch.Tensor, torch.Tensor] | None = None,
          progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train a model as ``cfg`` says.

    Args:
        data: ``(x, y)`` training tensors; by default the dataset's train split is loaded.

    Returns:
        The trained model (eval mode) and a history with per-epoch loss, accuracy and seconds.
    """
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    dataset = Dataset.parse(cfg.dataset)
    x_all, y_all = data if data is not None else load_dataset(dataset, "train", data_dir=data_dir)
    if cfg.train_subset is not None:
        if cfg.train_subset > x_all.shape[0]:
            raise ValueError(f"train_subset {cfg.train_subset} is larger than the "
                             f"{x_all.shape[0]} training examples")
        x_all, y_all = x_all[:cfg.train_subset], y_all[:cfg.train_subset]
    model = create_model(cfg.architecture, num_classes=dataset.num_classes,
                         in_channels=dataset.input_shape[0]).to(device)
    opt = _optimizer(model, cfg)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    n, history = x_all.shape[0], {"epochs": []}
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    logger.info("training %s with %s on %d %s examples for %d epochs", cfg.architecture,
                cfg.method, n, dataset.value, cfg.epochs)

    start, steps_done = time.time(), 0
    for epoch in range(cfg.epochs):
        if cfg.max_steps is not None and steps_done >= cfg.max_steps:
            break
        model.train()
        order = torch.randperm(n, generator=shuffle_gen)
        total_loss, correct, t0 = 0.0, 0, time.time()
        # Refresh at most once a second: a log file then gets a line a second, not ten.
        bar = tqdm(range(steps_per_epoch), desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False, unit="batch", mininterval=1.0)
        for i in bar:
            if cfg.max_steps is not None and steps_done >= cfg.max_steps:
                logger.info("stopping after max_steps=%d weight steps", cfg.max_steps)
                break
            steps_done += 1
            progress_epochs = epoch + i / steps_per_epoch
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, progress_epochs)
            eps = cfg.eps
            if cfg.eps_warmup_epochs > 0:
                eps = cfg.eps * min(1.0, (progress_epochs + 1 / steps_per_epoch)
                                    / cfg.eps_warmup_epochs)
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if cfg.augment:
                x = _augment(x, gen)
            loss, logits = method_loss(model, x, y, cfg, gen, eps=eps)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch "
                                         f"{epoch + 1}, batch {i + 1}; lower the lr or eta")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * y.shape[0]
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        record = {"epoch": epoch + 1, "loss": total_loss / n, "train_acc": 100 * correct / n,
                  "seconds": time.time() - t0}
        history["epochs"].append(record)
        logger.info("epoch %d/%d: loss %.4f, accuracy on the training objective %.2f%% (%.0f s)",
                    epoch + 1, cfg.epochs, record["loss"], record["train_acc"],
                    record["seconds"])
    history["seconds"] = time.time() - start
    model.eval()
    return model, history


def _device(name: str) -> torch.device:
    """The torch device named ``name``, or a clear error when it does not exist here."""
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {name!r} is not usable here ({first}); use cpu, or cuda on "
                         "a machine with a GPU") from None
    return device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, path: str | Path, cfg: TrainConfig,
                    history: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (safetensors) and ``path`` with ``.json`` (the model card) beside it."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    dataset = Dataset.parse(cfg.dataset)
    card = {
        "architecture": cfg.architecture,
        "dataset": dataset.value,
        "num_classes": dataset.num_classes,
        "in_channels": dataset.input_shape[0],
        "training": {"method": cfg.method, "hyperparameters": cfg.to_dict()},
        "history": history or {},
        "weights_sha256": file_sha256(path),
        "versions": {"torch": torch.__version__},
    }
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def _read_card(card_path: Path) -> dict[str, Any]:
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"model card {str(card_path)!r} is not valid JSON: {err}") from None
    if not isinstance(card, dict):
        raise ValueError(f"model card {str(card_path)!r} must hold a JSON object, got "
                         f"{type(card).__name__}")
    return card


def load_checkpoint(path: str | Path, *, architecture: str | None = None,
                    device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a safetensors checkpoint and its model card (or build ``architecture`` bare).

    Returns:
        The model in eval mode and the card (with ``weights_sha256`` recomputed from the file).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    card = _read_card(path.with_suffix(".json"))
    arch = architecture or card.get("architecture")
    if arch is None:
        raise ValueError(f"{str(path)!r} has no model card ({path.with_suffix('.json').name}); "
                         "pass the architecture name (--arch) to build the model")
    model = create_model(arch, num_classes=card.get("num_classes", 10),
                         in_channels=card.get("in_channels"))
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"weights in {str(path)!r} do not fit {arch}: "
                         f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"weights in {str(path)!r} do not fit {arch}: missing {missing}, "
                         f"unexpected {unexpected}")
    card = {**card, "architecture": arch, "weights_sha256": file_sha256(path)}
    return model.to(device).eval(), card
