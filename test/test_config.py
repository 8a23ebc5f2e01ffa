"""depthkd_core.config: YAML -> dataclasses, overrides, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from depthkd_core.config import apply_overrides, from_dict, load_config, parse_yaml, save_config


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 10
    name: str | None = None
    sizes: tuple[int, ...] = (1, 2)


@dataclass
class Outer:
    root: str
    inner: Inner = field(default_factory=Inner)
    opt_inner: Inner | None = None
    kwargs: dict = field(default_factory=dict)
    flag: bool = False


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_to_nested_dataclass(tmp_path: Path) -> None:
    path = write(tmp_path, "root: data/x\ninner:\n  lr: 1\n  sizes: [3, 4]\nkwargs: {a: 1}\n")
    cfg = load_config(Outer, path)
    assert cfg == Outer(root="data/x", inner=Inner(lr=1.0, sizes=(3, 4)), kwargs={"a": 1})
    assert isinstance(cfg.inner.lr, float) and isinstance(cfg.inner.sizes, tuple)


def test_exponent_floats_without_dot_are_floats() -> None:
    # plain yaml.safe_load (YAML 1.1) returns the string '1e-3' here
    assert parse_yaml("a: 1e-3\nb: -2E+4\nc: 1.5e2\nd: 12\ne: 1e\n") == {
        "a": 1e-3, "b": -2e4, "c": 150.0, "d": 12, "e": "1e"}


def test_unknown_key_names_the_section(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in inner: lrr"):
        load_config(Outer, write(tmp_path, "root: x\ninner: {lrr: 1}\n"))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in Outer: bogus"):
        load_config(Outer, write(tmp_path, "root: x\nbogus: 1\n"))


def test_missing_required_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing required config key\(s\) in Outer: root"):
        load_config(Outer, write(tmp_path, "flag: true\n"))
    with pytest.raises(ValueError, match="inner.steps has the wrong type"):
        load_config(Outer, None, ["root=x", "inner.steps=abc"])
    with pytest.raises(ValueError, match="inner must be a mapping"):
        load_config(Outer, None, ["root=x", "inner=3"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(Outer, tmp_path / "absent.yaml")


def test_overrides_nested_and_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "root: x\ninner:\n")  # empty section -> defaults
    cfg = load_config(Outer, path, ["inner.lr=1e-4", "opt_inner.name=abc", "flag=true",
                                    "kwargs.alpha=0.5", "inner.name=null", "root=a=b"])
    assert cfg.inner == Inner(lr=1e-4)
    assert cfg.opt_inner == Inner(name="abc")
    assert cfg.flag is True and cfg.kwargs == {"alpha": 0.5} and cfg.root == "a=b"
    assert load_config(Outer, path).opt_inner is None


def test_bad_override_syntax() -> None:
    with pytest.raises(ValueError, match="not of the form key=value"):
        apply_overrides({}, ["inner.lr"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        apply_overrides({}, ["inner..lr=1"])
    with pytest.raises(ValueError, match="'root' is not a section"):
        apply_overrides({"root": "x"}, ["root.sub=1"])
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_overrides({}, ["overrides=[a=1,b=[1,2]]"])
    assert apply_overrides({}, ["overrides=[a=1,'b=[1,2]']"]) == {"overrides": ["a=1", "b=[1,2]"]}


def test_saved_config_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(Outer, {"root": "r", "inner": {"lr": 2e-5, "sizes": [7]},
                            "opt_inner": {"steps": 3}, "kwargs": {"k": [1, 2]}, "flag": True})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Outer, tmp_path / "config.yaml") == cfg
    assert not list(tmp_path.glob(".*.tmp"))


@dataclass
class Collection:
    items: list[Inner] = field(default_factory=list)
    named: dict[str, Inner] = field(default_factory=dict)


def test_lists_and_maps_of_sections() -> None:
    cfg = from_dict(Collection, {"items": [{"lr": 1}, {}], "named": {"a": {"steps": 3}}})
    assert cfg.items == [Inner(lr=1.0), Inner()] and isinstance(cfg.items[0].lr, float)
    assert cfg.named == {"a": Inner(steps=3)}
    with pytest.raises(ValueError, match=r"unknown config key\(s\) in items\[1\]: bogus"):
        from_dict(Collection, {"items": [{}, {"bogus": 1}]})
    with pytest.raises(ValueError, match=r"named.a.steps has the wrong type"):
        from_dict(Collection, {"named": {"a": {"steps": "many"}}})
    with pytest.raises(ValueError, match="items must be a list"):
        from_dict(Collection, {"items": {"lr": 1}})
