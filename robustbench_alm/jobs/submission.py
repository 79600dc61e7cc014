"""Submissions: metadata, weights that run no code on load, and the checks before queueing.

A submission is a folder (or a .zip, .tar, .tar.gz archive of one) holding ``submission.toml``
and one weights file::

    name = "cnn-small, AMO-PGD"
    authors = ["A. Author", "B. Author"]
    link = "https://arxiv.org/abs/..."        # the paper
    dataset = "fashion-mnist"
    threat_model = "Linf"
    eps = "0.1"                               # or 8/255, or a number
    architecture = "cnn-small"                # registry name, "timm:<name>", or free text (.pt2)
    training_method = "amo-pgd"
    additional_data = false
    license = "MIT"
    weights = "model.safetensors"             # optional when there is one weights file

Weights, in forms whose loading runs no code of the submitter's:

- ``.safetensors`` for an architecture of the registry (or ``timm:<name>``, with timm
  installed): names, shapes, dtypes and finiteness are checked against the architecture;
- ``.pt`` / ``.pth``: a state dict saved with ``torch.save``, read only with
  ``torch.load(weights_only=True)`` (a pickle that needs code to load is refused);
- ``.pt2``: a ``torch.export`` program. ``torch.export.load`` itself unpickles some members
  with ``weights_only=False``, so every member is vetted first (each pickle inside must load
  with ``weights_only=True``; custom objects are refused), and the vetted bytes are the ones
  loaded.

Anything else is refused. :func:`validate` gathers every problem before reporting (metadata,
weights, the test forward pass), each with what was expected. Job layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch
from torch import nn

from robustbench_alm import checks
from robustbench_alm.entry import safe_entry_id
from robustbench_alm.jobs.archive import METADATA_FILE, SubmissionError
from robustbench_alm.models import available_models, create_model
from robustbench_alm.threat import Dataset, ThreatModel, check_eps, parse_eps

__all__ = ["SUBMISSION_SCHEMA", "Submission", "LoadedModel", "read_metadata", "validate",
           "load_model", "WEIGHTS_FORMATS"]

logger = logging.getLogger(__name__)

#: Weights file endings accepted, and what each holds.
WEIGHTS_FORMATS = {
    ".safetensors": "safetensors tensors for a registry or timm architecture",
    ".pt2": "a torch.export program archive",
    ".pt": "a state dict saved with torch.save, read with weights_only=True",
    ".pth": "a state dict saved with torch.save, read with weights_only=True",
}
#: Endings that usually hold weights in a form that is refused.
_REFUSED_FORMATS = (".bin", ".pkl", ".pickle", ".ckpt", ".joblib", ".h5", ".hdf5", ".onnx",
                    ".npz", ".npy", ".tar", ".msgpack")
_TIMM = "timm:"
#: Problems of one kind listed before the rest are counted.
_LIST_LIMIT = 20
#: Inputs of the test forward pass.
_TEST_BATCH = 4

_TEXT = {"type": "string", "minLength": 1}
SUBMISSION_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "robustbench-alm submission.toml",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "authors", "link", "dataset", "threat_model", "eps", "architecture",
                 "training_method", "additional_data", "license"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "authors": {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}]},
        "link": {"type": "string", "pattern": r"^https?://\S+$"},
        "dataset": {"enum": [d.value for d in Dataset]},
        "threat_model": {"enum": [t.value for t in ThreatModel]},
        "eps": {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, _TEXT]},
        "architecture": _TEXT,
        "training_method": _TEXT,
        "additional_data": {"type": "boolean"},
        "license": _TEXT,
        "weights": _TEXT,
        "entry_id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "venue": {"type": "string"},
        "footnote": {"type": "string"},
        "training_hyperparameters": {"type": "object"},
    },
}
#: What each field should hold, quoted in the messages.
_EXPECTED = {
    "name": 'a display name, e.g. "cnn-small, AMO-PGD"',
    "authors": 'a string or a list of strings, e.g. ["A. Author", "B. Author"]',
    "link": 'the paper\'s URL, e.g. "https://arxiv.org/abs/2001.00001"',
    "dataset": ", ".join(d.value for d in Dataset),
    "threat_model": ", ".join(t.value for t in ThreatModel),
    "eps": 'a positive number or a fraction such as "8/255"',
    "architecture": f"{', '.join(available_models())}, timm:<model name>, or a description "
                    "for a .pt2 program",
    "training_method": 'the training method, e.g. "pgd-at"',
    "additional_data": "true or false: was data beyond the dataset's training split used",
    "license": 'the weights\' licence, e.g. "MIT" or "CC-BY-4.0"',
    "weights": "the weights file's path inside the submission",
    "entry_id": "letters, digits, '.', '_' and '-'",
    "venue": "a string",
    "footnote": "a string",
    "training_hyperparameters": "a table of the training hyperparameters",
}


@dataclass
class LoadedModel:
    """A submission's model, ready to evaluate."""

    model: nn.Module
    architecture: str
    weights_sha256: str
    weights_format: str


@dataclass
class Submission:
    """A validated submission: its metadata, its model, and where it lies."""

    root: Path
    meta: dict[str, Any]
    loaded: LoadedModel
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta["name"]

    def entry_meta(self) -> dict[str, Any]:
        """The descriptive fields of the entry this submission's evaluation gets."""
        meta = self.meta
        authors = meta["authors"]
        return {
            "name": meta["name"],
            "entry_id": meta.get("entry_id") or safe_entry_id(meta["name"]),
            "authors": authors if isinstance(authors, str) else ", ".join(authors),
            "link": meta["link"],
            "venue": meta.get("venue", ""),
            "footnote": meta.get("footnote"),
            "additional_data": meta["additional_data"],
            "training": {"method": meta["training_method"],
                         "hyperparameters": meta.get("training_hyperparameters", {})},
            "architecture": self.loaded.architecture,
            "weights_sha256": self.loaded.weights_sha256,
        }


def read_metadata(root: Path, problems: list[str], *, partial: bool = False
                  ) -> dict[str, Any] | None:
    """``submission.toml`` checked against the schema; its problems are appended.

    Returns None when there are problems, or with ``partial`` the table as read (when it is
    valid TOML), so that the fields that are right can still be used to check the weights.
    """
    path = root / METADATA_FILE
    if not path.is_file():
        problems.append(f"{METADATA_FILE}: missing; expected a TOML file at the submission's "
                        "root with name, authors, link, dataset, threat_model, eps, "
                        "architecture, training_method, additional_data and license")
        return None
    try:
        meta = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{METADATA_FILE}: not valid TOML ({err}); expected key = value lines, "
                        'e.g. name = "my model"')
        return None
    validator = jsonschema.Draft202012Validator(SUBMISSION_SCHEMA)
    found = []
    for error in sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path)):
        key = ".".join(map(str, error.absolute_path))
        if error.validator == "required":
            missing = re.findall(r"'([^']+)' is a required property", error.message)
            key = missing[0] if missing else key
            found.append(f"{METADATA_FILE}: {key}: missing; expected "
                         f"{_EXPECTED.get(key, 'a value')}")
        elif error.validator == "additionalProperties":
            extra = sorted(set(meta) - set(SUBMISSION_SCHEMA["properties"]))
            found.append(f"{METADATA_FILE}: unknown key{'s' if len(extra) > 1 else ''} "
                         f"{', '.join(map(repr, extra))}; accepted keys: "
                         f"{', '.join(SUBMISSION_SCHEMA['properties'])}")
        else:
            top = str(error.absolute_path[0]) if error.absolute_path else key
            value = error.instance
            found.append(f"{METADATA_FILE}: {key or '<root>'}: got {value!r}; expected "
                         f"{_EXPECTED.get(top, error.message)}")
    problems.extend(found)
    if found:
        return meta if partial else None
    try:
        eps = parse_eps(meta["eps"])
        check_eps(eps, ThreatModel.parse(meta["threat_model"]))
    except ValueError as err:
        problems.append(f"{METADATA_FILE}: eps: {err}")
        return meta if partial else None
    return {**meta, "eps": eps}


def _find_weights(root: Path, meta: dict[str, Any] | None, problems: list[str]) -> Path | None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != METADATA_FILE)
    if isinstance(meta, dict) and isinstance(meta.get("weights"), str):
        path = (root / meta["weights"])
        rel = meta["weights"]
        if path.resolve() not in {f.resolve() for f in files}:
            listed = ", ".join(repr(f.relative_to(root).as_posix()) for f in files) or "none"
            problems.append(f"weights: {rel!r} is not a file of the submission; expected one "
                            f"of {listed}")
            return None
    else:
        known = [f for f in files if f.suffix.lower() in WEIGHTS_FORMATS]
        if len(known) > 1:
            names = ", ".join(repr(f.relative_to(root).as_posix()) for f in known)
            problems.append(f"weights: several weights files ({names}); name the one to "
                            f"evaluate with weights = \"...\" in {METADATA_FILE}")
            return None
        if not known:
            refused = [f for f in files if f.suffix.lower() in _REFUSED_FORMATS]
            what = (f"{', '.join(repr(f.relative_to(root).as_posix()) for f in refused)} "
                    "is in a refused format" if refused else "none found")
            problems.append(f"weights: {what}; expected one file ending in "
                            f"{', '.join(WEIGHTS_FORMATS)}")
            return None
        path = known[0]
    suffix = path.suffix.lower()
    if suffix not in WEIGHTS_FORMATS:
        accepted = "; ".join(f"{k} ({v})" for k, v in WEIGHTS_FORMATS.items())
        problems.append(f"weights: {path.name!r} is in an unsupported format "
                        f"({suffix or 'no ending'}); accepted: {accepted}")
        return None
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_state_dict(path: Path, data: bytes, problems: list[str]
                     ) -> dict[str, torch.Tensor] | None:
    """Tensors from a safetensors file or a weights_only pickle; None with problems."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types for a bad header
            problems.append(f"weights {path.name!r}: not a readable safetensors file "
                            f"({_first_line(err)})")
            return None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        problems.append(
            f"weights {path.name!r}: refused, the pickle needs code to load "
            f"({_first_line(err)}); expected only tensors (torch.save(model.state_dict())), "
            "which load with weights_only=True, or better a .safetensors file")
        return None
    except Exception as err:  # a damaged file: zipfile, EOF and runtime errors alike
        problems.append(f"weights {path.name!r}: not a readable torch.save file "
                        f"({_first_line(err)})")
        return None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        problems.append(f"weights {path.name!r}: holds a {type(state).__name__}, expected a "
                        "state dict (a dict of tensor names to tensors)")
        return None
    return state


def _listed(items: list[str]) -> list[str]:
    if len(items) <= _LIST_LIMIT:
        return items
    return items[:_LIST_LIMIT] + [f"... and {len(items) - _LIST_LIMIT} more like these"]


def _shape(t: torch.Tensor | torch.Size) -> str:
    return str(tuple(t.shape if isinstance(t, torch.Tensor) else t))


def _compare_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   arch: str, problems: list[str]) -> None:
    """Names, shapes, dtypes and finite values of ``state`` against the architecture's."""
    found = []
    for name, ref in expected.items():
        if name not in state:
            found.append(f"weights: tensor {name!r} missing; expected shape {_shape(ref)}, "
                         f"{str(ref.dtype).removeprefix('torch.')} for {arch}")
    for name, tensor in state.items():
        ref = expected.get(name)
        if ref is None:
            found.append(f"weights: unexpected tensor {name!r} (shape {_shape(tensor)}); "
                         f"{arch} has no tensor of that name")
            continue
        if tensor.shape != ref.shape:
            found.append(f"weights: tensor {name!r} has shape {_shape(tensor)}; expected "
                         f"{_shape(ref)} for {arch}")
        if tensor.dtype != ref.dtype:
            found.append(f"weights: tensor {name!r} has dtype "
                         f"{str(tensor.dtype).removeprefix('torch.')}; expected "
                         f"{str(ref.dtype).removeprefix('torch.')}")
        if tensor.is_floating_point() or tensor.is_complex():
            n_nan = int(torch.isnan(tensor).sum())
            n_inf = int(torch.isinf(tensor).sum())
            if n_nan or n_inf:
                found.append(f"weights: tensor {name!r} has {n_nan} NaN and {n_inf} infinite "
                             "values; expected finite values")
    problems.extend(_listed(found))


def _build_architecture(arch: str, ds: Dataset, problems: list[str]) -> nn.Module | None:
    kwargs = {"num_classes": ds.num_classes}
    if arch.startswith(_TIMM):
        try:
            import timm
        except ImportError:
            problems.append(f"architecture {arch!r} needs the timm package, which is not "
                            "installed here; pip install 'robustbench-alm[timm]'")
            return None
        name = arch[len(_TIMM):]
        if not timm.is_model(name):
            problems.append(f"architecture {arch!r}: timm has no model {name!r}; expected a "
                            "name from timm.list_models()")
            return None
        return timm.create_model(name, pretrained=False, in_chans=ds.input_shape[0], **kwargs)
    try:
        return create_model(arch, in_channels=ds.input_shape[0], **kwargs)
    except ValueError as err:
        hint = ""
        try:
            import timm

            if timm.is_model(arch):
                hint = f" (timm knows it: write architecture = \"timm:{arch}\")"
        except ImportError:
            pass
        problems.append(f"architecture: {err}, timm:<name> with timm installed, or a .pt2 "
                        f"program{hint}")
        return None


class ExportedProgram(nn.Module):
    """A ``torch.export`` program as a module: its graph is fixed, and so is its mode.

    An exported program cannot switch between train and eval (it was traced in one); this
    wrapper accepts ``eval()`` and ``train()`` and leaves the graph as it was exported.
    """

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedProgram:
        self.training = mode
        return self


#: Members of a .pt2 archive that load compiled code (AOTInductor shared libraries).
_COMPILED = ("data/aotinductor/",)
_COMPILED_SUFFIXES = (".so", ".dll", ".dylib")
#: Payload configs that may route members through pickle.
_PAYLOAD_CONFIGS = {"data/weights/": "weights", "data/constants/": "constants"}


def _vet_pt2(data: bytes, name: str, problems: list[str]) -> bool:
    """Check that loading this torch.export archive runs no code of the submitter's.

    ``torch.export.load`` unpickles some members with ``weights_only=False`` (payloads marked
    ``use_pickle``, sample inputs when the safe load fails, legacy weight files), unpickles
    custom and opaque objects with plain pickle, and loads AOTInductor shared libraries. So:
    each member that may be unpickled must load with ``weights_only=True``; custom objects and
    compiled code are refused; and a name that appears twice (readers may disagree on which
    copy counts) is refused.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        problems.append(f"weights {name!r}: not a torch.export archive (.pt2 is a zip): {err}")
        return False
    found: list[str] = []
    with archive:
        infos = archive.infolist()
        # Members sit under the archive's own top folder; the loader reads paths below it.
        short = {info.filename: info.filename.split("/", 1)[-1] for info in infos}
        names = [short[i.filename] for i in infos]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            found.append(f"weights {name!r}: member {dup!r} appears twice; expected each once")
        to_vet = set()
        for info in infos:
            member = short[info.filename]
            if member.startswith(_COMPILED) or member.endswith(_COMPILED_SUFFIXES):
                found.append(f"weights {name!r}: member {member!r} is compiled code "
                             "(AOTInductor), which loading would run; expected an exported "
                             "program without compiled artifacts")
                continue
            content = archive.read(info)
            if member.endswith(".pt") or content[:4] == b"PK\x03\x04":
                to_vet.add(info.filename)
            folder = next((f for f in _PAYLOAD_CONFIGS if member.startswith(f)), None)
            if folder and member.endswith("_config.json"):
                for path, problem in _payload_config(content, name):
                    if problem:
                        found.append(problem)
                    else:
                        top = info.filename[:len(info.filename) - len(member)]
                        to_vet.add(f"{top}{folder}{path}")
        for filename in sorted(to_vet):
            try:
                torch.load(io.BytesIO(archive.read(filename)), map_location="cpu",
                           weights_only=True)
            except KeyError:
                found.append(f"weights {name!r}: its config names {filename!r}, which is not "
                             "in the archive")
            except Exception as err:
                found.append(f"weights {name!r}: member {short.get(filename, filename)!r} is a "
                             f"pickle that needs code to load ({_first_line(err)}); expected "
                             "tensors only")
    problems.extend(found)
    return not found


def _payload_config(content: bytes, name: str) -> list[tuple[str, str | None]]:
    """(member, None) for each payload loaded through pickle, (path, problem) for objects."""
    try:
        config = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    entries = config.get("config") if isinstance(config, dict) else None
    out: list[tuple[str, str | None]] = []
    for fqn, meta in (entries or {}).items():
        if not isinstance(meta, dict):
            continue
        path = str(meta.get("path_name", ""))
        if re.search(r"(custom_obj|opaque_obj)", path):
            out.append((path, f"weights {name!r}: constant {fqn!r} is a custom object, which "
                              "torch.export.load unpickles with code; expected tensors only"))
        elif meta.get("use_pickle"):
            out.append((path, None))
    return out


def _load_exported(data: bytes, name: str, problems: list[str]) -> nn.Module | None:
    if not _vet_pt2(data, name, problems):
        return None
    try:
        program = torch.export.load(io.BytesIO(data))  # the same bytes that were vetted
        return ExportedProgram(program.module())
    except Exception as err:  # torch raises many types for an archive it cannot read
        problems.append(f"weights {name!r}: torch.export.load could not read it "
                        f"({_first_line(err)}); expected an archive written by "
                        "torch.export.save with this PyTorch version")
        return None


def load_model(root: str | Path) -> LoadedModel:
    """The submission's model, without running any of its code.

    Raises:
        SubmissionError: listing every problem with the metadata or the weights.
    """
    root = Path(root)
    problems: list[str] = []
    meta = read_metadata(root, problems)
    loaded = _load_model(root, meta, problems)
    if problems or loaded is None:
        raise SubmissionError(root.name, problems or ["the model could not be loaded"])
    return loaded


def _load_model(root: Path, meta: dict[str, Any] | None, problems: list[str]
                ) -> LoadedModel | None:
    """Load the weights (reporting their own problems even when the metadata is unusable)."""
    path = _find_weights(root, meta, problems)
    if path is None:
        return None
    return _load(path, path.read_bytes(), path.suffix.lower(), meta, problems)


def _usable(meta: dict[str, Any] | None) -> tuple[str | None, Dataset | None]:
    """The architecture and dataset, where the metadata gives them validly (even if other
    fields are wrong), so that the weights can be checked in the same pass."""
    if not isinstance(meta, dict):
        return None, None
    arch = meta.get("architecture")
    arch = arch if isinstance(arch, str) and arch else None
    try:
        ds = Dataset.parse(meta.get("dataset")) if isinstance(meta.get("dataset"), str) \
            else None
    except ValueError:
        ds = None
    return arch, ds


def _load(path: Path, data: bytes, suffix: str, meta: dict[str, Any] | None,
          problems: list[str]) -> LoadedModel | None:
    weights_sha = _sha256(data)
    arch, ds = _usable(meta)
    if suffix == ".pt2":
        model = _load_exported(data, path.name, problems)
        if model is None:
            return None
        return LoadedModel(model.eval(), arch or "torch.export program", weights_sha,
                           "torch.export")
    state = _load_state_dict(path, data, problems)
    if arch is None or ds is None:
        return None
    model = _build_architecture(arch, ds, problems)
    if model is None or state is None:
        return None
    before = len(problems)
    _compare_state(state, model.state_dict(), arch, problems)
    if len(problems) > before:
        return None
    model.load_state_dict(state)
    return LoadedModel(model.eval(), arch, weights_sha, suffix.removeprefix("."))


def _test_forward(loaded: LoadedModel, ds: Dataset, problems: list[str]) -> None:
    """One forward pass on real-shaped inputs in [0, 1], against the model contract."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(_TEST_BATCH, *ds.input_shape, generator=gen)
    where = "test forward pass"
    try:
        logits = checks.check_forward(loaded.model, x)
        checks.check_batch_independence(loaded.model, x)
    except checks.ContractError as err:
        hint = ""
        if loaded.weights_format == "torch.export":
            hint = ("; export with a dynamic batch dimension, e.g. dynamic_shapes="
                    "{'x': {0: torch.export.Dim('batch')}}")
        problems.append(f"{where}: {_first_line(err)}{hint}")
        return
    except Exception as err:  # an exported graph's guards raise AssertionError, among others
        hint = ""
        if loaded.weights_format == "torch.export":
            hint = ("; expected a program that takes any batch size, exported with "
                    "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}")
        problems.append(f"{where} on inputs of shape {_shape(x)}: {_first_line(err)}{hint}")
        return
    if logits.shape[1] != ds.num_classes:
        problems.append(f"{where}: the model returns {logits.shape[1]} class scores; expected "
                        f"{ds.num_classes} for {ds.value}")
    if not torch.isfinite(logits).all():
        problems.append(f"{where}: the model returns NaN or infinite logits on inputs in "
                        "[0, 1]; expected finite logits")


def validate(root: str | Path) -> Submission:
    """Check a submission's metadata, weights and test forward pass; every problem at once.

    Raises:
        SubmissionError: listing every problem found, each with what was expected.
    """
    root = Path(root)
    problems: list[str] = []
    meta = read_metadata(root, problems, partial=True)
    loaded = _load_model(root, meta, problems)
    _, ds = _usable(meta)
    if loaded is not None and ds is not None:
        _test_forward(loaded, ds, problems)
    if problems or loaded is None:
        raise SubmissionError(root.name, problems or ["the model could not be loaded"])
    return Submission(root=root, meta=meta, loaded=loaded)
