"""Attack suites: named, versioned TOML files that say which attacks run, in which order.

A suite file lives in the top-level ``attacks/`` folder (shipped inside the package as
``robustbench_alm._suites``) or anywhere on disk. Its sha256 goes into every entry, so two
numbers are comparable only when they came from byte-identical suites.

Format::

    name = "pgd-20"
    description = "..."
    threat_models = ["Linf", "L2"]

    [[attack]]
    name = "pgd-20"        # how the entry names this stage
    kind = "pgd"           # which implementation runs it
    steps = 20             # the kind's own parameters
    step_size = "eps/4"

Vocabulary layer: plain Python; no torch.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_alm.threat import ThreatModel

__all__ = ["AttackSpec", "Suite", "load_suite", "available_suites"]

#: The attack kinds the harness knows; the attack layer maps each to an implementation.
ATTACK_KINDS = ("pgd", "fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square",
                "square-adaptive", "foolbox")


_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class AttackSpec:
    """One stage of a suite: a named attack kind with its parameters."""

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """A parsed suite file."""

    name: str
    description: str
    threat_models: tuple[ThreatModel, ...]
    attacks: tuple[AttackSpec, ...]
    sha256: str
    path: Path

    def check_threat_model(self, threat_model: ThreatModel) -> None:
        if threat_model not in self.threat_models:
            accepted = ", ".join(t.value for t in self.threat_models)
            raise ValueError(
                f"suite {self.name!r} is defined for {accepted}, not {threat_model.value}"
            )


def _suite_folder() -> Path:
    # An installed package carries the suites as robustbench_alm/_suites (pyproject.toml maps the
    # repository's attacks/ folder there); a source checkout (editable install, tests) reads
    # attacks/ itself. The folder beside this file, not importlib.resources: _suites has no
    # __init__.py, and Python 3.11 gives a namespace package a MultiplexedPath whose str() is
    # no path.
    installed = Path(__file__).resolve().parent / "_suites"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "attacks"


def available_suites() -> list[str]:
    """Names of the suites shipped with the package."""
    return sorted(p.stem for p in _suite_folder().glob("*.toml"))


def _parse_attack(raw: Any, where: str) -> AttackSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each attack must be a [[attack]] table, got {raw!r}")
    params = dict(raw)
    name, kind = params.pop("name", None), params.pop("kind", None)
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
        raise ValueError(f"{where}: every [[attack]] needs a name of letters, digits, '.', '_' "
                         f"or '-' (it names the stage in entries), got {name!r}")
    if kind not in ATTACK_KINDS:
        raise ValueError(
            f"{where}: attack {name!r} has kind {kind!r}; expected one of {', '.join(ATTACK_KINDS)}"
        )
    return AttackSpec(name=name, kind=kind, params=params)


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a shipped suite by name (``standard``) or any suite file by path.

    Raises:
        ValueError: if the suite is unknown or its file is malformed.
    """
    path = Path(name_or_path)
    if not path.suffix == ".toml":
        path = _suite_folder() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ValueError(
                f"unknown attack suite {str(name_or_path)!r}; shipped suites: "
                f"{', '.join(available_suites())}; or pass the path of a .toml suite file"
            )
    elif not path.is_file():
        raise ValueError(f"suite file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"suite file {str(path)!r} is not valid TOML: {err}") from None

    attacks = raw.get("attack")
    if not isinstance(attacks, list) or not attacks:
        raise ValueError(f"suite file {str(path)!r} lists no [[attack]] stages")
    specs = tuple(_parse_attack(a, str(path)) for a in attacks)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"suite file {str(path)!r} repeats an attack name: {names}")
    threat_models = raw.get("threat_models", ["Linf"])
    if not isinstance(threat_models, list) or not threat_models:
        raise ValueError(f"suite file {str(path)!r}: threat_models must be a non-empty list "
                         f"such as [\"Linf\", \"L2\"], got {threat_models!r}")
    return Suite(
        name=str(raw.get("name", path.stem)),
        description=str(raw.get("description", "")),
        threat_models=tuple(ThreatModel.parse(t) for t in threat_models),
        attacks=specs,
        sha256=hashlib.sha256(data).hexdigest(),
        path=path,
    )
