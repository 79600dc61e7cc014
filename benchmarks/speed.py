"""Speed benchmark: every comparison side by side in one run, on the same model, points and seed.

    .venv/bin/python benchmarks/speed.py            # or: make benchmark
    .venv/bin/python benchmarks/speed.py --device cuda --n-examples 1000

It measures, and writes to ``benchmarks/RESULTS.md``:

1. the ``fast`` suite against AutoAttack ``standard`` on a panel of models (standard-trained,
   PGD-trained and AMO-PGD-trained CNNs on real Fashion-MNIST; the standard-trained CNN behind a
   layer whose backward returns zeros; the CIFAR-10 ResNet-18 checkpoint shipped in
   pyautoattack's wheel on foolbox's 20 CIFAR-10 sample images): wall time, robust accuracy,
   and per example the points each suite calls robust that the other broke;
2. one training step of ``amo-pgd`` (fused and plain) against ``pgd-at`` with the same PGD
   steps, and against ``standard``, on the same batches;
3. the all-layer margin search of n points against PGD-20 on the same n points, with the gap
   to a long (100-step) search;
4. throughput in examples per second for each, with the machine and library versions.

Ratios are of wall-clock times measured in this one process; timings interleave the
contenders round by round, so a busy machine slows all of them alike. Trained panel models are
cached under ``runs/benchmarks/`` and reused when their configuration matches.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from robustbench_alm import margins
from robustbench_alm.attacks import PGD, Budget
from robustbench_alm.data import load_dataset
from robustbench_alm.evaluation import run_evaluation
from robustbench_alm.models import GradientMasked, create_model
from robustbench_alm.threat import ThreatModel
from robustbench_alm.training import (TrainConfig, fused_amo_pgd, load_checkpoint,
                                      method_loss, save_checkpoint, train)

logger = logging.getLogger("benchmarks.speed")

EPS_FMNIST = 0.1
EPS_CIFAR = 8 / 255
# The Fashion-MNIST panel: cnn-small, same optimizer and epochs; robust ones with PGD-3.
PANEL = {
    "standard": dict(method="standard"),
    "pgd-at": dict(method="pgd-at", pgd_steps=3, eps_warmup_epochs=0.5),
    "amo-pgd": dict(method="amo-pgd", pgd_steps=3, eps_warmup_epochs=0.5),
}


# ---------------------------------------------------------------------------------------------
# The panel of models


def trained_model(name: str, args, cache: Path) -> tuple[nn.Module, float | None]:
    """A panel model, trained now or read from the cache; with its training seconds."""
    cfg = TrainConfig(architecture="cnn-small", dataset="fashion-mnist", epochs=args.epochs,
                      train_subset=args.train_subset, eps=EPS_FMNIST, seed=0,
                      device=args.device, **PANEL[name])
    path = cache / f"{name}.safetensors"
    card_path = path.with_suffix(".json")
    if path.is_file() and card_path.is_file():
        card = json.loads(card_path.read_text())
        if card["training"]["hyperparameters"] == cfg.to_dict():
            logger.info("reusing %s (same configuration)", path)
            model, _ = load_checkpoint(path)
            return model.to(args.device).eval(), card.get("history", {}).get("seconds")
    model, history = train(cfg, progress=args.progress)
    save_checkpoint(model, path, cfg, history)
    return model.eval(), history["seconds"]


def cifar_resnet18(device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """pyautoattack's CIFAR-10 ResNet-18 checkpoint and foolbox's 20 CIFAR-10 test images."""
    import foolbox
    import pyautoattack
    from pyautoattack.examples.resnet import ResNet18

    path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model = ResNet18()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = model.to(device).eval()
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=device)
    x, y = foolbox.utils.samples(fmodel, dataset="cifar10", batchsize=20,
                                 data_format="channels_first", bounds=(0, 1))
    return model, x.to(device), y.to(device)


# ---------------------------------------------------------------------------------------------
# 1. fast against standard


def compare_suites(label, model, x, y, dataset, eps, args) -> dict:
    """Run standard and fast on the same points and seed; per-example disagreements."""
    out = {"model": label, "n": int(x.shape[0])}
    robust = {}
    for suite in ("standard", "fast"):
        t0 = time.perf_counter()
        ev = run_evaluation(model, x, y, dataset=dataset, eps=eps, suite=suite, seed=0,
                            batch_size=args.batch_size, margins=False, progress=args.progress)
        out[f"{suite}_seconds"] = time.perf_counter() - t0
        out[f"{suite}_acc"] = ev.entry["robust_acc"]
        out[f"{suite}_stages"] = [(s["name"], s["n_broken"], s["seconds"])
                                  for s in ev.entry["attacks"]]
        out["clean_acc"] = ev.entry["clean_acc"]
        robust[suite] = ev.per_example["robust"]
    # Points fast calls robust that standard broke (fast weaker there), and the reverse.
    out["fast_misses"] = int((robust["fast"] & ~robust["standard"]).sum())
    out["fast_extra"] = int((robust["standard"] & ~robust["fast"]).sum())
    out["speedup"] = out["standard_seconds"] / out["fast_seconds"]
    logger.info("%s: standard %.2f%% in %.1f s, fast %.2f%% in %.1f s (%.1fx); fast misses %d, "
                "breaks %d more", label, out["standard_acc"], out["standard_seconds"],
                out["fast_acc"], out["fast_seconds"], out["speedup"], out["fast_misses"],
                out["fast_extra"])
    return out


# ---------------------------------------------------------------------------------------------
# 2. training steps


def _step_timer(model, cfg, batches, gen):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(i):
        x, y = batches[i % len(batches)]
        loss, _ = method_loss(model, x, y, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_training_steps(model_factory, x, y, args) -> dict:
    """Seconds per training step of each method, interleaved round by round."""
    forms = {
        "standard": TrainConfig(method="standard"),
        "pgd-at": TrainConfig(method="pgd-at", pgd_steps=3, eps=EPS_FMNIST),
        "amo-pgd (fused)": TrainConfig(method="amo-pgd", pgd_steps=3, eps=EPS_FMNIST),
        "amo-pgd (plain)": TrainConfig(method="amo-pgd", pgd_steps=3, eps=EPS_FMNIST,
                                       amo_form="plain"),
    }
    bs = 128
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, args.train_steps * bs, bs)]
    steps = {}
    for name, cfg in forms.items():
        model = model_factory().train()
        steps[name] = _step_timer(model, cfg, batches, torch.Generator().manual_seed(0))
        for i in range(3):  # warm-up: allocator, kernels
            steps[name](i)
    times = {name: [] for name in forms}
    for i in range(args.train_steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(i)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def perturbation_agreement(model, x, y) -> dict:
    """How close the fused AMO perturbation is to the plain one on one batch (train mode)."""
    from robustbench_alm.training import amo_perturbation, frozen_norm_stats
    from robustbench_alm.attacks import pgd

    budget = Budget(ThreatModel.LINF, EPS_FMNIST)
    step = 2.5 * EPS_FMNIST / 3
    model.train()
    with frozen_norm_stats(model):
        x_fused, d_fused = fused_amo_pgd(model, x, y, budget, pgd_steps=3, step_size=step,
                                         amo_steps=1, eta=0.002,
                                         generator=torch.Generator().manual_seed(0))
        x_plain = pgd(model, x, y, budget, steps=3, step_size=step, random_start=True,
                      generator=torch.Generator().manual_seed(0), keep_best=False)
        d_plain = amo_perturbation(model, x_plain, y, steps=1, eta=0.002)
    model.eval()
    flat_f = torch.cat([d.flatten(1) for d in d_fused.values()], 1)
    flat_p = torch.cat([d.flatten(1) for d in d_plain.values()], 1)
    cos = torch.nn.functional.cosine_similarity(flat_f, flat_p, dim=1)
    ratio = flat_f.norm(dim=1) / flat_p.norm(dim=1).clamp_min(1e-12)
    return {"cosine_median": cos.median().item(), "cosine_min": cos.min().item(),
            "norm_ratio_median": ratio.median().item(),
            "x_equal": bool(torch.equal(x_fused, x_plain))}


# ---------------------------------------------------------------------------------------------
# 3. margin search against PGD-20


def time_margins(model, x, y, args) -> dict:
    budget = Budget(ThreatModel.LINF, EPS_FMNIST)
    attack = PGD(budget, steps=20, step_size="eps/4", seed=0)
    out, found = {}, {}
    runs = {
        "pgd-20": lambda: [attack(model, x[i:i + args.batch_size], y[i:i + args.batch_size])
                           for i in range(0, x.shape[0], args.batch_size)],
        "margin search (default)": lambda: margins.all_layer_margin(
            model, x, y, batch_size=args.batch_size, progress=False),
        "margin search (100 steps)": lambda: margins.all_layer_margin(
            model, x, y, steps=100, batch_size=args.batch_size, progress=False),
    }
    for r in range(args.rounds):
        for name, run in runs.items():
            if r and name.endswith("(100 steps)"):
                continue  # the long search is the quality reference, timed once
            t0 = time.perf_counter()
            result = run()
            out.setdefault(name, []).append(time.perf_counter() - t0)
            if name.startswith("margin"):
                found[name] = result
    times = {name: min(t) for name, t in out.items()}
    default, long = found["margin search (default)"], found["margin search (100 steps)"]
    both = torch.isfinite(default) & torch.isfinite(long) & (long > 0)
    rel = (default[both] / long[both]) if both.any() else torch.tensor([float("nan")])
    return {"seconds": times, "n": int(x.shape[0]),
            "median_default": default.median().item(), "median_long": long.median().item(),
            "ratio_median": rel.median().item(), "ratio_q90": rel.quantile(0.9).item(),
            "not_found_default": int((~torch.isfinite(default)).sum()),
            "not_found_long": int((~torch.isfinite(long)).sum())}


# ---------------------------------------------------------------------------------------------
# The report


def versions(device: str) -> dict:
    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpu": _cpu_name(), "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
           "device": device}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    for dist in ("torch", "pyautoattack", "foolbox", "numpy", "robustbench-alm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render(results: dict, args, total_seconds: float) -> str:
    lines = ["# Speed benchmark", "",
             "Written by `make benchmark` (`benchmarks/speed.py`); every number below comes from "
             "one run of it on the machine described at the end. Times are wall clock.", ""]
    lines += _render_suites(results["suites"])
    lines += _render_training(results["training"], results["agreement"])
    lines += _render_margins(results["margins"])
    lines += ["## Machine and versions", ""]
    lines += [f"- {k}: {v}" for k, v in results["versions"].items()]
    lines += [f"- settings: {vars(args)}", f"- whole run: {total_seconds / 60:.1f} min", ""]
    return "\n".join(lines)


def _render_suites(rows) -> list[str]:
    lines = ["## 1. `fast` against AutoAttack `standard`", "",
             "Same points, seed and batch size. *fast misses*: points `fast` calls robust that "
             "`standard` broke (where `fast` is weaker); *fast breaks more*: the reverse.", "",
             "| model | n | clean | standard | fast | standard s | fast s | speed-up "
             "| fast misses | fast breaks more |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['clean_acc']:.2f}% | "
                     f"{r['standard_acc']:.2f}% | {r['fast_acc']:.2f}% | "
                     f"{r['standard_seconds']:.1f} | {r['fast_seconds']:.1f} | "
                     f"{r['speedup']:.1f}x | {r['fast_misses']} | {r['fast_extra']} |")
    total_std = sum(r["standard_seconds"] for r in rows)
    total_fast = sum(r["fast_seconds"] for r in rows)
    lines += ["", f"Whole panel: standard {total_std:.1f} s, fast {total_fast:.1f} s, "
              f"**{total_std / total_fast:.1f}x**.", "", "Stages (name, points broken, seconds):",
              ""]
    for r in rows:
        fmt = lambda stages: ", ".join(f"{n} {b} ({s:.1f} s)" for n, b, s in stages)  # noqa
        lines.append(f"- {r['model']}: standard: {fmt(r['standard_stages'])}; "
                     f"fast: {fmt(r['fast_stages'])}")
    throughput = ", ".join(f"{r['model']}: standard {r['n'] / r['standard_seconds']:.1f}, "
                           f"fast {r['n'] / r['fast_seconds']:.1f}" for r in rows)
    return lines + ["", f"Throughput (examples per second): {throughput}.", ""]


def _render_training(times, agreement) -> list[str]:
    base = times["pgd-at"]
    lines = ["## 2. Training step: `amo-pgd` against `pgd-at` (PGD-3) and `standard`", "",
             "Median seconds per step of batch 128 (cnn-small, Fashion-MNIST), the methods "
             "interleaved step by step on the same batches.", "",
             "| method | s / step | examples / s | vs pgd-at | vs standard |",
             "|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t:.4f} | {128 / t:.0f} | {t / base:.3f}x | "
                     f"{t / times['standard']:.2f}x |")
    lines += ["", "Fused against plain AMO perturbation on one batch of the AMO-PGD model "
              f"(train mode): cosine similarity median {agreement['cosine_median']:.4f} "
              f"(min {agreement['cosine_min']:.4f}), norm ratio median "
              f"{agreement['norm_ratio_median']:.4f}; the PGD examples are identical: "
              f"{agreement['x_equal']}.", ""]
    return lines


def _render_margins(m) -> list[str]:
    s = m["seconds"]
    pgd = s["pgd-20"]
    lines = ["## 3. All-layer margin search against PGD-20", "",
             f"{m['n']} test points of the AMO-PGD model; best of the rounds.", "",
             "| run | seconds | examples / s | vs PGD-20 |", "|---|---|---|---|"]
    for name, t in s.items():
        lines.append(f"| {name} | {t:.2f} | {m['n'] / t:.0f} | {t / pgd:.2f}x |")
    lines += ["", f"Quality: median margin {m['median_default']:.4f} (default search) against "
              f"{m['median_long']:.4f} (100 steps); per point, default / long has median "
              f"{m['ratio_median']:.4f} and 90th percentile {m['ratio_q90']:.4f} (both are "
              "upper bounds, lower is better); not found: "
              f"{m['not_found_default']} (default), {m['not_found_long']} (100 steps).", ""]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a machine with a GPU")
    p.add_argument("--n-examples", type=int, default=500, help="Fashion-MNIST test points")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the panel models")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train the panel on the first N training images (default: all)")
    p.add_argument("--train-steps", type=int, default=30, help="timed steps per method")
    p.add_argument("--rounds", type=int, default=3,
                   help="timing rounds for margins (the best round counts)")
    p.add_argument("--cache", type=Path, default=Path("runs/benchmarks"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    p.add_argument("--progress", action="store_true", help="show progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()

    x, y = load_dataset("fashion-mnist", "test")
    x, y = x[:args.n_examples].to(args.device), y[:args.n_examples].to(args.device)
    panel, train_seconds = {}, {}
    for name in PANEL:
        panel[name], train_seconds[name] = trained_model(name, args, args.cache)
    masked = GradientMasked(panel["standard"]).eval()

    results = {"versions": versions(args.device), "train_seconds": train_seconds, "suites": []}
    for name, model in (*panel.items(), ("standard, gradients masked", masked)):
        results["suites"].append(compare_suites(f"{name} (Fashion-MNIST)", model, x, y,
                                                "fashion-mnist", EPS_FMNIST, args))
    cifar_model, cx, cy = cifar_resnet18(args.device)
    results["suites"].append(compare_suites("pyautoattack ResNet-18 (CIFAR-10, foolbox samples)",
                                            cifar_model, cx, cy, "cifar10", EPS_CIFAR, args))

    xt, yt = load_dataset("fashion-mnist", "train")
    n_train = args.train_steps * 128
    xt, yt = xt[:n_train].to(args.device), yt[:n_train].to(args.device)
    results["training"] = time_training_steps(
        lambda: create_model("cnn-small", num_classes=10, in_channels=1).to(args.device),
        xt, yt, args)
    results["agreement"] = perturbation_agreement(panel["amo-pgd"], xt[:128], yt[:128])
    results["margins"] = time_margins(panel["amo-pgd"], x, y, args)

    total = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results, args, total))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    logger.info("wrote %s (%.1f min)", args.out, total / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
