"""`depthkd list methods|models|losses|readers`: each registry with each entry's options.

Like timm's ``list_models``, but with the options a config can set and their defaults:
a method's ``method_kwargs`` dataclass, a loss's ``loss_kwargs`` (its constructor), a
reader's keyword arguments, and the ``ModelConfig`` fields every model shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any, Callable

KINDS = ("methods", "models", "losses", "readers")


def _summary(item: Any) -> str:
    doc = inspect.getdoc(item) or ""
    return doc.splitlines()[0] if doc else ""


def _dataclass_options(cls: type) -> dict[str, Any]:
    options = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            options[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            options[f.name] = f.default_factory()
        else:
            options[f.name] = "(required)"
    return options


def _signature_options(factory: Callable[..., Any], skip: int) -> dict[str, Any]:
    """Keyword options of ``factory`` after its first ``skip`` positional parameters."""
    params = list(inspect.signature(factory).parameters.values())[skip:]
    return {p.name: "(required)" if p.default is inspect.Parameter.empty else p.default
            for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def catalog(kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, one-line summary, {option: default}) for every entry of the ``kind`` registry."""
    if kind == "methods":
        from depthkd_core.methods import METHODS
        return [(k, _summary(METHODS.get(k)), _dataclass_options(METHODS.get(k).Config))
                for k in METHODS]
    if kind == "losses":
        from depthkd_core.losses import LOSSES
        return [(k, _summary(LOSSES.get(k)), _signature_options(LOSSES.get(k), 0)) for k in LOSSES]
    if kind == "readers":
        from depthkd_core.data.readers import READERS
        return [(k, _summary(READERS.get(k)), _signature_options(READERS.get(k), 1))
                for k in READERS]
    if kind == "models":
        from depthkd_core.models import MODELS
        return [(k, _summary(MODELS.get(k)), {}) for k in MODELS]
    raise ValueError(f"unknown kind '{kind}'; one of {', '.join(KINDS)}")


def _format_options(options: dict[str, Any]) -> list[str]:
    return [f"    {name} = {value!r}" for name, value in options.items()]


def format_catalog(kind: str) -> str:
    lines = []
    for key, summary, options in catalog(kind):
        lines.append(f"{key:<14} {summary}")
        lines += _format_options(options)
    if kind == "models":
        from depthkd_core.models import ModelConfig
        lines += ["", "options of every model (ModelConfig; `model:` in a config):"]
        lines += _format_options(_dataclass_options(ModelConfig))
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="which registry to print")


def run_cli(args: argparse.Namespace) -> int:
    print(format_catalog(args.kind))
    return 0
