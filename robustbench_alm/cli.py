"""The ``robustbench-alm`` command line: train, evaluate, leaderboard, compare, RobustBench I/O,
submissions and jobs.

    robustbench-alm train --method amo-pgd --epochs 3 --out runs/amo-pgd.safetensors
    robustbench-alm evaluate runs/amo-pgd.safetensors --eps 0.1 --suite standard
    robustbench-alm leaderboard --html leaderboards/site
    robustbench-alm compare amo-pgd pgd-at
    robustbench-alm import-robustbench robustbench/model_info/cifar10/Linf
    robustbench-alm study studies/all-layer-margin/study.toml
    robustbench-alm submit my-model.tar.gz --suite quick && robustbench-alm worker --drain
    robustbench-alm jobs

Thin on purpose: it parses arguments, calls one function of the package and reports. Choices
come from the package's own lists so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from robustbench_alm.threat import Dataset, ThreatModel, parse_eps

logger = logging.getLogger("robustbench_alm")

_DATASETS = [d.value for d in Dataset]
_THREAT_MODELS = [t.value for t in ThreatModel]


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, except None and False, which say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None
                or default is False or default == [] or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".strip()


def _eps(text: str) -> float:
    try:
        return parse_eps(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _at_least(low: int):
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def _add_train(sub) -> None:
    from robustbench_alm.models import available_models
    from robustbench_alm.training import LR_SCHEDULES, METHODS, OPTIMIZERS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", formatter_class=_HelpFormatter,
        help="train a model (standard, pgd-at, trades, amo, amo-pgd)",
        description="Train a model on a dataset and save a safetensors checkpoint with a JSON "
                    "model card beside it (architecture, dataset, method, every hyperparameter).",
        epilog="example: robustbench-alm train --method amo-pgd --epochs 3 "
               "--out runs/amo-pgd.safetensors")
    p.add_argument("--method", choices=METHODS, default="amo-pgd",
                   help="training method")
    p.add_argument("--arch", default=d.architecture,
                   help=f"architecture: {', '.join(available_models())}")
    p.add_argument("--dataset", choices=_DATASETS, default=d.dataset, help="training data")
    p.add_argument("--data-dir", help="folder to look in first for the dataset files")
    p.add_argument("--out", type=Path, help="checkpoint path, ending in .safetensors "
                   "(default: runs/<method>-<arch>-seed<seed>.safetensors)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs, help="passes over the data")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="examples per step")
    g.add_argument("--train-subset", type=_positive_int,
                   help="train on the first N training examples only")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="weight optimizer")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--no-nesterov", action="store_true", help="plain SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="learning-rate schedule over the epochs")
    g.add_argument("--milestones", type=int, nargs="*", default=[],
                   help="epochs where the multistep schedule multiplies the lr by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="multistep factor")
    g.add_argument("--augment", action="store_true", help="pad-4 random crop and flip")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds init, order and attacks")
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    a = p.add_argument_group("adversary (pgd-at, trades, amo-pgd)")
    a.add_argument("--threat-model", choices=_THREAT_MODELS, default=d.threat_model,
                   help="norm of the training adversary")
    a.add_argument("--eps", type=_eps, default=d.eps, help="radius, e.g. 0.1 or 8/255")
    a.add_argument("--eps-warmup-epochs", type=float, default=d.eps_warmup_epochs,
                   help="ramp eps linearly from 0 over this many epochs")
    a.add_argument("--pgd-steps", type=int, default=d.pgd_steps, help="PGD steps k")
    a.add_argument("--pgd-step-size", help="number, 'eps/K' or 'K*eps' "
                   "(default: 2.5 * eps / steps)")
    a.add_argument("--trades-beta", type=float, default=d.trades_beta, help="TRADES beta")
    m = p.add_argument_group("all-layer margin optimization (amo, amo-pgd)")
    m.add_argument("--amo-steps", type=int, default=d.amo_steps, help="ascent steps t")
    m.add_argument("--amo-eta", type=float, default=d.amo_eta,
                   help="ascent step eta on the per-example loss")
    m.add_argument("--amo-lambda", type=float, default=d.amo_lambda,
                   help="delta decay lambda in delta <- (1 - eta lambda) delta + eta grad")
    m.add_argument("--delta-scale", choices=["input", "output"], default=d.delta_scale,
                   help="scale delta by the norm of the layer's input (the paper's "
                        "definition) or output (the paper's released code)")
    m.add_argument("--amo-form", choices=["fused", "plain"], default=d.amo_form,
                   help="amo-pgd: take the first AMO step from the last PGD step's backward "
                        "pass (fused, the cost of pgd-at) or run it after PGD (plain)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from robustbench_alm.training import TrainConfig, save_checkpoint, train

    cfg = TrainConfig(
        method=args.method, architecture=args.arch, dataset=args.dataset, epochs=args.epochs,
        batch_size=args.batch_size, train_subset=args.train_subset, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay, lr_schedule=args.lr_schedule,
        milestones=tuple(args.milestones), lr_gamma=args.lr_gamma, augment=args.augment,
        threat_model=args.threat_model, eps=args.eps, eps_warmup_epochs=args.eps_warmup_epochs,
        pgd_steps=args.pgd_steps, pgd_step_size=args.pgd_step_size,
        trades_beta=args.trades_beta, amo_steps=args.amo_steps, amo_eta=args.amo_eta,
        amo_lambda=args.amo_lambda, delta_scale=args.delta_scale, amo_form=args.amo_form,
        seed=args.seed,
        device=args.device)
    out = args.out or Path("runs") / f"{cfg.method}-{cfg.architecture}-seed{cfg.seed}.safetensors"
    model, history = train(cfg, data_dir=args.data_dir, progress=not args.quiet)
    path = save_checkpoint(model, out, cfg, history)
    last = history["epochs"][-1]
    print(f"saved {path} (model card {path.with_suffix('.json')}); last epoch: loss "
          f"{last['loss']:.4f}, training-objective accuracy {last['train_acc']:.2f}%, "
          f"{history['seconds']:.0f} s in all")
    return 0


def _add_evaluate(sub) -> None:
    from robustbench_alm.suites import available_suites

    p = sub.add_parser(
        "evaluate", formatter_class=_HelpFormatter,
        help="attack a checkpoint with a suite, estimate margins, write its entry",
        description="Evaluate a checkpoint: clean accuracy, each attack's robust accuracy and "
                    "the worst case over the suite, all-layer margins and input-space minimal "
                    "distances per example; writes the leaderboard entry "
                    "<leaderboard-dir>/<dataset>/<threat model>/<entry id>.json.",
        epilog="example: robustbench-alm evaluate runs/amo-pgd-cnn-small-seed0.safetensors "
               "--eps 0.1 --suite standard --n-examples 500")
    p.add_argument("checkpoint", type=Path, nargs="?",
                   help="a .safetensors file (model card beside it); optional with "
                        "--model-factory, whose model it then loads the weights into")
    p.add_argument("--model-factory", metavar="FILE.py:NAME",
                   help="evaluate the nn.Module that NAME() in your Python file returns (runs "
                        "that file: use it for your own code only)")
    p.add_argument("--output", metavar="INDEX_OR_KEY",
                   help="pick the logits from a forward that returns a tuple (index) or a dict "
                        "(key); recorded in the entry")
    p.add_argument("--arch", help="architecture, when the checkpoint has no model card")
    p.add_argument("--dataset", choices=_DATASETS,
                   help="dataset (default: the one in the model card)")
    p.add_argument("--data-dir", help="folder to look in first for the dataset files")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split")
    p.add_argument("--n-examples", type=_positive_int,
                   help="evaluate the first N examples of the split (default: 500)")
    p.add_argument("--indices-file", type=Path,
                   help="a JSON list of example indices to evaluate instead of the first N")
    p.add_argument("--threat-model", choices=_THREAT_MODELS, default="Linf",
                   help="norm of the adversary's ball")
    p.add_argument("--eps", type=_eps, required=True, help="radius, e.g. 0.1 or 8/255")
    p.add_argument("--suite", default="standard",
                   help=f"attack suite: {', '.join(available_suites())}, or a path to a .toml "
                        "suite file")
    p.add_argument("--seed", type=int, default=0, help="seed of every attack")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="points per batch")
    p.add_argument("--no-margins", action="store_true", help="skip the margin estimates")
    p.add_argument("--margin-steps", type=_positive_int, default=None,
                   help="search steps of the all-layer margin (default: 10, below the cost of "
                        "PGD-20)")
    p.add_argument("--fmn-steps", type=_positive_int, default=None,
                   help="steps of FMN for the input-space distance (default: 100)")
    p.add_argument("--delta-scale", choices=["input", "output"], default="input",
                   help="all-layer delta scaled by each layer's input or output norm")
    p.add_argument("--name", help="display name (default: from the checkpoint)")
    p.add_argument("--entry-id", help="file name of the entry (default: the checkpoint's stem)")
    p.add_argument("--authors", default="")
    p.add_argument("--link", default="")
    p.add_argument("--venue", default="")
    p.add_argument("--leaderboard-dir", type=Path, default=Path("leaderboards"))
    p.add_argument("--no-write", action="store_true", help="print the entry, write nothing")
    p.add_argument("--force", action="store_true",
                   help="replace an existing entry of the same id from a different evaluation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_evaluate)


def _check_replace(path: Path, entry: dict, force: bool) -> None:
    """Re-running the same evaluation replaces its entry; a different one must not, silently."""
    from robustbench_alm.entry import measurement_differences, read_entry

    if not path.exists() or force:
        return
    try:
        old = read_entry(path)
    except ValueError:
        return  # an unreadable file is no measurement to protect
    differ = measurement_differences(old, entry)
    if differ:
        raise ValueError(f"{path} already holds an entry evaluated with another "
                         f"{', '.join(differ)}; choose a new --entry-id, or pass --force to "
                         "replace it (the new results were not written)")
    logger.info("replacing %s with a re-run of the same evaluation", path)


def _read_indices(path: Path) -> list[int]:
    try:
        indices = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read indices file {str(path)!r}: {err}") from None
    if not isinstance(indices, list) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"indices file {str(path)!r} must hold a non-empty JSON list of "
                         "integers, e.g. [0, 5, 17]")
    if len(set(indices)) != len(indices):
        raise ValueError(f"indices file {str(path)!r} repeats an index; each example once")
    return indices


def _load_model(args):
    """The model to evaluate and its card, from a checkpoint, a factory, or both."""
    from robustbench_alm.training import load_checkpoint

    if args.model_factory is None:
        if args.checkpoint is None:
            raise ValueError("give a checkpoint, or --model-factory FILE.py:NAME")
        model, card = load_checkpoint(args.checkpoint, architecture=args.arch,
                                      device=args.device)
        return model, {**card, "stem": args.checkpoint.stem}
    model, name = _from_factory(args.model_factory)
    card = {"architecture": name, "weights_sha256": None, "stem": name}
    if args.checkpoint is not None:
        from safetensors.torch import load_file

        from robustbench_alm.training import file_sha256

        try:
            model.load_state_dict(load_file(str(args.checkpoint)))
        except Exception as err:  # safetensors and torch raise their own error types
            raise ValueError(f"cannot load {str(args.checkpoint)!r} into {name}: "
                             f"{str(err).splitlines()[-1].strip()}") from None
        card.update(weights_sha256=file_sha256(args.checkpoint), stem=args.checkpoint.stem)
    return model.to(args.device), card


def _from_factory(spec: str):
    import importlib.util

    from torch import nn

    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name.isidentifier():
        raise ValueError(f"--model-factory takes FILE.py:NAME, got {spec!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Python file at {path!r}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable named {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model, name


def _run_evaluate(args) -> int:
    from robustbench_alm.entry import entry_path, write_entry
    from robustbench_alm.evaluation import run_evaluation
    from robustbench_alm.per_example import examples_path, write_examples

    model, card = _load_model(args)
    indices = None
    if args.indices_file is not None:
        indices = _read_indices(args.indices_file)
        if args.n_examples is not None:
            raise ValueError("give either --n-examples or --indices-file, not both")
    dataset = args.dataset or card.get("dataset") or "fashion-mnist"
    stem = card["stem"]
    output = args.output
    if output is not None and output.lstrip("-").isdigit():
        output = int(output)
    result = run_evaluation(
        model, dataset=dataset, split=args.split, n_examples=args.n_examples or 500,
        indices=indices,
        data_dir=args.data_dir, threat_model=args.threat_model, eps=args.eps, suite=args.suite,
        seed=args.seed, batch_size=args.batch_size, margins=not args.no_margins,
        margin_steps=args.margin_steps, fmn_steps=args.fmn_steps, delta_scale=args.delta_scale,
        output=output,
        name=args.name or stem, entry_id=args.entry_id or stem,
        architecture=card["architecture"], training=card.get("training"),
        weights_sha256=card["weights_sha256"], authors=args.authors, link=args.link,
        venue=args.venue, progress=not args.quiet)
    entry = result.entry
    if args.no_write:
        print(json.dumps(entry, indent=2))
        return 0
    # The per-example rows are checked against the entry before either is written.
    rows = _per_example_rows(result, args.split, result.indices)
    _check_replace(entry_path(args.leaderboard_dir, entry), entry, args.force)
    path = write_entry(args.leaderboard_dir, entry)
    _report(entry, path)
    print(f"wrote {write_examples(examples_path(path), rows)}")
    return 0


def _per_example_rows(result, split: str, indices):
    """The evaluation's per-example tensors as the Parquet table kept beside its entry."""
    from robustbench_alm.per_example import build_frame, check_against_entry

    arrays = {name: tensor.detach().cpu().numpy() for name, tensor in result.per_example.items()}
    rows = build_frame(arrays, dataset=result.entry["dataset"], split=split,
                       indices=list(indices))
    check_against_entry(rows, result.entry)
    return rows


def _report(entry: dict, path: Path) -> None:
    print(f"{entry['name']}: {entry['dataset']}, {entry['threat_model']} eps "
          f"{entry['eps']:g} ({entry['eps_text']}), {entry['n_examples']} points")
    print(f"  clean accuracy        {entry['clean_acc']:6.2f}%")
    for stage in entry["attacks"]:
        print(f"  after {stage['name']:<15} {stage['robust_acc']:6.2f}%  "
              f"({stage['n_broken']} broken, {stage['seconds']:.0f} s)")
    print(f"  robust accuracy       {entry['robust_acc']:6.2f}%  (suite {entry['suite']['name']})")
    for key, label in (("all_layer", "all-layer margin"), ("input_space", "input distance")):
        stats = entry["margins"].get(key)
        if stats and stats["median"] is not None:
            mean = "n/a" if stats["mean"] is None else f"{stats['mean']:.4f}"
            missing = f" ({stats['n_not_found']} points with no bound)" \
                if stats.get("n_not_found") else ""
            print(f"  {label:<21} median {stats['median']:.4f}, mean {mean}{missing}")
    if entry.get("flags"):
        print(f"  flags: {', '.join(entry['flags'])}")
    print(f"wrote {path}")


def _add_study(sub) -> None:
    p = sub.add_parser(
        "study", formatter_class=_HelpFormatter,
        help="train methods over seeds, evaluate every model, write the study's RESULTS.md",
        description="Run a study file: train every (method, seed) at one shared budget, "
                    "evaluate each model with the PGD and AutoAttack suites plus margins, write "
                    "a leaderboard entry per model, run the sweep, and write RESULTS.md with "
                    "means, standard deviations, paired differences with confidence intervals, "
                    "plots and a verdict per claim. Rerunning resumes: finished models are "
                    "skipped.",
        epilog="example: robustbench-alm study studies/all-layer-margin/study.toml "
               "--set train.epochs=1 --no-sweep")
    p.add_argument("config", type=Path, help="the study's TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override a setting, e.g. train.epochs=2, seeds=[0], "
                        "sweep.seed=1 (the value is read as TOML, else as text)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the study file's)")
    p.add_argument("--data-dir", help="folder to look in first for the dataset files")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep")
    p.add_argument("--results-only", action="store_true",
                   help="train and evaluate nothing; rewrite RESULTS.md from the records")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_study)


def _parse_override(text: str) -> tuple[str, object]:
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes KEY=VALUE, e.g. train.epochs=2; got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # plain text such as wrn-28-10
    return key.strip(), parsed


def _run_study(args) -> int:
    from robustbench_alm.study import load_study_config, run_study

    overrides = dict(_parse_override(text) for text in args.overrides)
    if args.device is not None:
        overrides["device"] = args.device
    config = load_study_config(args.config, overrides)
    if args.device is not None:
        from robustbench_alm.training import _device

        _device(args.device)  # a clear error before any work, not after the first model
    path = run_study(config, data_dir=args.data_dir, sweep=not args.no_sweep,
                     results_only=args.results_only, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def _add_leaderboard(sub) -> None:
    p = sub.add_parser(
        "leaderboard", formatter_class=_HelpFormatter,
        help="regenerate and print the leaderboard tables (and web page, plots)",
        description="Read every entry under the leaderboard folder, write its README.md (one "
                    "table per dataset and threat model, sorted by robust accuracy) and print it; "
                    "optionally also a static web page, a CSV file and the plots.",
        epilog="example: robustbench-alm leaderboard --html leaderboards/site "
               "--csv leaderboards/leaderboard.csv --plots leaderboards/plots")
    p.add_argument("--dir", type=Path, default=Path("leaderboards"),
                   help="leaderboard folder")
    p.add_argument("--html", type=Path, metavar="OUT",
                   help="also write the web page into folder OUT (open OUT/index.html)")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also write every plot into DIR, as PNG and SVG")
    p.set_defaults(run=_run_leaderboard)


def _run_leaderboard(args) -> int:
    from robustbench_alm.leaderboard import entries_frame, write_csv, write_readme

    path, text = write_readme(args.dir)
    print(text)
    print(f"wrote {path}")
    if args.csv is not None:
        print(f"wrote {write_csv(entries_frame(args.dir), args.csv)}")
    if args.plots is not None:
        from robustbench_alm.plots import write_leaderboard_plots

        drawn = write_leaderboard_plots(args.dir, args.plots)
        print(f"wrote {len(drawn.files())} plot files to {args.plots}")
    if args.html is not None:
        from robustbench_alm.webpage import build_site

        print(f"wrote {build_site(args.dir, args.html)}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", formatter_class=_HelpFormatter,
        help="paired comparison of entries evaluated on the same examples",
        description="Compare the robust accuracy of two or more entries evaluated on the same "
                    "examples with the same suite and eps: bootstrap confidence intervals for "
                    "each accuracy and each difference, and the exact McNemar test on the "
                    "examples where exactly one model is robust (Holm-adjusted for several "
                    "pairs). Refuses entries that differ in eps, suite hash or example set.",
        epilog="example: robustbench-alm compare cnn-small-amo-pgd cnn-small-pgd-at")
    p.add_argument("entries", nargs="+", metavar="ENTRY",
                   help="an entry's JSON file, or its id under --dir")
    p.add_argument("--dir", type=Path, default=Path("leaderboards"),
                   help="leaderboard folder to find entry ids in")
    p.add_argument("--bootstrap", type=_at_least(100), default=10_000,
                   help="bootstrap resamples")
    p.add_argument("--confidence", type=_fraction, default=0.95,
                   help="coverage of the intervals")
    p.add_argument("--alpha", type=_fraction, default=0.05,
                   help="significance level of the verdicts")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also plot the entries' robust accuracy against eps and their margins")
    p.set_defaults(run=_run_compare)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}"
                                         ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def _resolve_entry(text: str, root: Path) -> Path:
    """An entry file given by path, or by id under the leaderboard folder."""
    path = Path(text)
    if path.is_file():
        return path
    matches = sorted(root.glob(f"*/*/{text}.json"))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise FileNotFoundError(f"no entry {text!r}: not a file, and no {root}/*/*/{text}.json")
    raise ValueError(f"entry id {text!r} is ambiguous under {root}: "
                     f"{', '.join(map(str, matches))}; give the file instead")


def _run_compare(args) -> int:
    from robustbench_alm.compare import compare, format_comparison, load_entries

    paths = [_resolve_entry(text, args.dir) for text in args.entries]
    entries, frames = load_entries(paths)
    result = compare(entries, frames, n_bootstrap=args.bootstrap, confidence=args.confidence,
                     alpha=args.alpha, seed=args.seed)
    print(format_comparison(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plots is not None:
        written = _compare_plots(entries, frames, args.plots)
        print(f"wrote {len(written)} plot files to {args.plots}")
    return 0


def _compare_plots(entries, frames, out: Path) -> list[Path]:
    from robustbench_alm.plots import CurveItem, plot_margin_histograms, plot_robustness_curves

    first = entries[0]
    curves = [CurveItem(e["entry_id"], f, e["eps"], e["robust_acc"])
              for e, f in zip(entries, frames)]
    written = plot_robustness_curves(curves, out / "compare-robustness-vs-eps",
                                     threat_model=first["threat_model"])
    written += plot_margin_histograms([(e["entry_id"], f) for e, f in zip(entries, frames)],
                                      out / "compare-margins",
                                      threat_model=first["threat_model"], eps=first["eps"])
    return written


def _add_robustbench(sub) -> None:
    p = sub.add_parser(
        "import-robustbench", formatter_class=_HelpFormatter,
        help="import RobustBench model_info records as reported entries",
        description="Read RobustBench model_info records (files, or folders searched for "
                    "*.json, filed as <dataset>/<threat model>/<model>.json) and write them as "
                    "entries marked 'reported, not re-evaluated here'.",
        epilog="example: robustbench-alm import-robustbench robustbench/model_info/cifar10/Linf")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--threat-model", choices=_THREAT_MODELS,
                   help="threat model of every record (default: from each file's folder)")
    p.add_argument("--dir", type=Path, default=Path("leaderboards"),
                   help="leaderboard folder to write into")
    p.set_defaults(run=_run_import_robustbench)

    p = sub.add_parser(
        "export-robustbench", formatter_class=_HelpFormatter,
        help="write entries as RobustBench model_info records",
        description="Write entries as RobustBench model_info records, filed as "
                    "OUT/<dataset>/<threat model>/<entry id>.json. An evaluated entry needs an "
                    "AutoAttack accuracy (the standard suite).",
        epilog="example: robustbench-alm export-robustbench cnn-small-amo-pgd --out model_info")
    p.add_argument("entries", nargs="*", metavar="ENTRY",
                   help="entry files or ids under --dir (default: every entry evaluated here)")
    p.add_argument("--dir", type=Path, default=Path("leaderboards"),
                   help="leaderboard folder")
    p.add_argument("--out", type=Path, required=True, help="folder to write the records into")
    p.set_defaults(run=_run_export_robustbench)


def _evaluated_at(root: Path, entry: dict) -> bool:
    from robustbench_alm.entry import entry_path, entry_source, read_entry

    path = entry_path(root, entry)
    try:
        return path.is_file() and entry_source(read_entry(path)) == "evaluated"
    except ValueError:
        return False  # an unreadable file is not an evaluation worth keeping


def _run_import_robustbench(args) -> int:
    from robustbench_alm.entry import entry_path, write_entry
    from robustbench_alm.robustbench_io import import_model_info

    entries = import_model_info(args.paths, threat_model=args.threat_model)
    # Never replace an entry measured here with a reported one of the same id.
    clashes = [str(entry_path(args.dir, e)) for e in entries if _evaluated_at(args.dir, e)]
    if clashes:
        raise ValueError(f"refusing to overwrite entries evaluated here: {', '.join(clashes)}; "
                         "import into another --dir or rename the records")
    for entry in entries:
        write_entry(args.dir, entry)
    boards = sorted({f"{e['dataset']}/{e['threat_model']}" for e in entries})
    print(f"imported {len(entries)} reported entries into {args.dir} ({', '.join(boards)})")
    return 0


def _run_export_robustbench(args) -> int:
    from robustbench_alm.entry import entry_source, iter_entries, read_entry
    from robustbench_alm.robustbench_io import to_model_info

    if args.entries:
        entries = [read_entry(_resolve_entry(text, args.dir)) for text in args.entries]
    else:
        entries = [e for _, e in iter_entries(args.dir) if entry_source(e) == "evaluated"]
    # Convert every entry first: one that cannot be exported leaves nothing half written.
    records = [(entry, to_model_info(entry)) for entry in entries]
    for entry, record in records:
        path = args.out / entry["dataset"] / entry["threat_model"] / f"{entry['entry_id']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0


def _add_submit(sub) -> None:
    from robustbench_alm.suites import available_suites

    p = sub.add_parser(
        "submit", formatter_class=_HelpFormatter,
        help="validate a submission (folder, .zip, .tar.gz) and queue its evaluation",
        description="Unpack a submission safely, check submission.toml against its schema, the "
                    "weights against the architecture (names, shapes, dtypes, finite values) "
                    "and a test forward pass against the model contract, then queue a job in "
                    "the store. Every problem is reported at once and nothing is queued.",
        epilog="example: robustbench-alm submit my-model.tar.gz --suite quick --n-examples 500")
    p.add_argument("path", type=Path, help="a folder, .zip, .tar or .tar.gz archive")
    p.add_argument("--store", type=Path, default=_default_store(), help="job store (SQLite)")
    p.add_argument("--suite", default="standard",
                   help=f"attack suite: {', '.join(available_suites())}, or a .toml file")
    p.add_argument("--n-examples", type=_positive_int, default=500,
                   help="evaluate the first N examples of the split")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split")
    p.add_argument("--seed", type=int, default=0, help="seed of every attack")
    p.add_argument("--batch-size", type=_positive_int, default=250, help="points per batch")
    p.add_argument("--no-margins", action="store_true", help="skip the margin estimates")
    p.add_argument("--margin-steps", type=_positive_int, default=None,
                   help="search steps of the all-layer margin (default: 10)")
    p.add_argument("--fmn-steps", type=_positive_int, default=None,
                   help="steps of FMN for the input-space distance (default: 100)")
    p.add_argument("--max-bytes", type=_positive_int, default=_archive_limit("MAX_BYTES"),
                   help="largest unpacked submission accepted, in bytes")
    p.add_argument("--max-files", type=_positive_int, default=_archive_limit("MAX_FILES"),
                   help="most files accepted in a submission")
    p.set_defaults(run=_run_submit)


def _default_store() -> Path:
    from robustbench_alm.jobs.store import DEFAULT_STORE

    return DEFAULT_STORE


def _archive_limit(name: str) -> int:
    from robustbench_alm.jobs import archive

    return getattr(archive, name)


def _run_submit(args) -> int:
    from robustbench_alm.jobs.worker import submit

    done = submit(args.path, args.store, suite=args.suite, n_examples=args.n_examples,
                  split=args.split, seed=args.seed, batch_size=args.batch_size,
                  margins=not args.no_margins, margin_steps=args.margin_steps,
                  fmn_steps=args.fmn_steps, max_bytes=args.max_bytes, max_files=args.max_files)
    if done.created:
        print(f"queued job {done.job_id}: {done.name} (submission sha256 {done.sha256})")
    else:
        print(f"already in {args.store} as job {done.job_id} ({done.state}): the same "
              f"submission (sha256 {done.sha256}) with the same settings; not queued again")
    return 0


def _add_worker(sub) -> None:
    from robustbench_alm.jobs import DEFAULT_LEASE, EXECUTORS

    p = sub.add_parser(
        "worker", formatter_class=_HelpFormatter,
        help="take queued jobs and run them (locally or on a Ray cluster)",
        description="Claim queued jobs from the store and run them, committing results per "
                    "attack stage and batch; a worker killed at any moment and started again "
                    "continues where it stopped. Writes each finished job's entry and "
                    "per-example results under the leaderboard folder.",
        epilog="example: robustbench-alm worker --drain --executor ray")
    p.add_argument("--store", type=Path, default=_default_store(), help="job store (SQLite)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="run units in this process, or as Ray tasks")
    p.add_argument("--ray-address", help="connect to this Ray cluster (default: start a local "
                   "instance listening on 127.0.0.1)")
    p.add_argument("--ray-cpus", type=_positive_int, help="CPUs of a local Ray instance")
    p.add_argument("--concurrent", type=_positive_int, default=1, help="jobs run at once")
    p.add_argument("--once", action="store_true", help="run at most one job, then exit")
    p.add_argument("--drain", action="store_true",
                   help="exit when no job is left to claim instead of waiting for new ones")
    p.add_argument("--leaderboard-dir", type=Path, default=Path("leaderboards"),
                   help="where finished jobs' entries are written")
    p.add_argument("--data-dir", help="folder to look in first for the dataset files")
    p.add_argument("--device", default="cpu", help="device of the local executor")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE,
                   help="seconds a job stays claimed without a heartbeat")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the queue")
    p.set_defaults(run=_run_worker)


def _run_worker(args) -> int:
    from robustbench_alm.jobs.worker import run_worker

    report = run_worker(args.store, executor=args.executor, ray_address=args.ray_address,
                        ray_num_cpus=args.ray_cpus, once=args.once, drain=args.drain,
                        leaderboard_dir=args.leaderboard_dir, data_dir=args.data_dir,
                        device=args.device, lease_seconds=args.lease, poll_seconds=args.poll,
                        concurrent=args.concurrent)
    print(f"worker stopped: {len(report.done)} done, {len(report.failed)} failed"
          + (f" (jobs {', '.join(map(str, report.failed))}: see robustbench-alm jobs)"
             if report.failed else ""))
    return 1 if report.failed else 0


def _add_jobs(sub) -> None:
    p = sub.add_parser(
        "jobs", formatter_class=_HelpFormatter,
        help="list the jobs in the store with their state and progress",
        description="List the jobs of a store: state (queued, running, done, failed), progress "
                    "of the running ones, robust accuracy of the finished ones, and why failed "
                    "ones failed. Needs no torch.",
        epilog="example: robustbench-alm jobs --store jobs/store.sqlite")
    p.add_argument("--store", type=Path, default=_default_store(), help="job store (SQLite)")
    p.add_argument("--show", type=int, metavar="ID", help="print one job in full, as JSON")
    p.add_argument("--requeue", type=int, metavar="ID",
                   help="queue a failed job again (it resumes from its committed results)")
    p.set_defaults(run=_run_jobs)


def _run_jobs(args) -> int:
    from dataclasses import asdict

    from robustbench_alm.jobs.store import JobStore

    with JobStore(args.store, create=False) as store:
        if args.requeue is not None:
            job = store.requeue(args.requeue)
            print(f"job {job.id} queued again")
            return 0
        if args.show is not None:
            data = asdict(store.get(args.show))
            data["settings"].pop("suite_text", None)
            print(json.dumps(data, indent=2))
            return 0
        jobs = store.jobs()
    if not jobs:
        print(f"no jobs in {args.store}")
        return 0
    print(f"{'id':>4}  {'state':<8} {'name':<28} {'submission':<12}  progress / result")
    for job in jobs:
        if job.state == "done" and job.entry:
            detail = (f"clean {job.entry['clean_acc']:.2f}%, robust {job.entry['robust_acc']:.2f}%"
                      f" -> {job.entry_path}")
        elif job.state == "failed":
            detail = f"failed: {(job.error or '').strip().splitlines()[0] if job.error else '?'}"
        else:
            detail = job.progress or ("waiting" if job.state == "queued" else "starting")
        s = job.settings
        print(f"{job.id:>4}  {job.state:<8} {job.name[:28]:<28} {job.submission_sha256[:12]}  "
              f"{detail}  [{s['suite']}, {s['threat_model']} eps {s['eps']:g}, "
              f"{s['n_examples']} points]")
    return 0


#: Commands that read entries only. Run on their own, they get a parser without train's
#: arguments, whose choices come from the training module and would import torch.
_TORCH_FREE_COMMANDS = ("leaderboard", "compare", "import-robustbench", "export-robustbench",
                        "jobs")


def build_parser(torch_free: bool = False) -> argparse.ArgumentParser:
    """The full parser; with ``torch_free``, only the commands that never need torch."""
    parser = argparse.ArgumentParser(
        prog="robustbench-alm",
        description="Train robust classifiers (PGD-AT, TRADES, all-layer margin optimization), "
                    "evaluate them with AutoAttack, PGD and Foolbox plus margin estimates, and "
                    "publish leaderboard entries.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if not torch_free:
        _add_train(sub)
        _add_evaluate(sub)
        _add_study(sub)
    _add_leaderboard(sub)
    _add_compare(sub)
    _add_robustbench(sub)
    if not torch_free:
        _add_submit(sub)
        _add_worker(sub)
    _add_jobs(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The command named on the line: the first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(torch_free=_command(argv) in _TORCH_FREE_COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        # Bad input: the message names what was received and what is accepted.
        print(f"robustbench-alm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
