"""The shared config validator: unknown keys, bad values and overrides give one clear error."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import apply_overrides, flatten, from_dict, load_yaml, parse_size, to_dict
from pipeline.errors import UserError


@dataclasses.dataclass(frozen=True)
class Optim:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    nesterov: bool = False

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Cfg:
    shards: Path
    epochs: int = 1
    optim: Optim = Optim()
    betas: tuple[float, float] = (0.9, 0.999)
    name: str | None = None


def test_round_trip_and_types():
    cfg = from_dict(Cfg, {"shards": "s", "epochs": 3, "optim": {"name": "adam", "lr": "1e-3"}, "betas": [0.8, 0.9]})
    assert cfg == Cfg(shards=Path("s"), epochs=3, optim=Optim("adam", 1e-3), betas=(0.8, 0.9))
    assert from_dict(Cfg, to_dict(cfg)) == cfg
    assert flatten(to_dict(cfg))["optim.lr"] == 1e-3


@pytest.mark.parametrize(
    "data, message",
    [
        ({"shards": "s", "epoch": 3}, "unknown key 'epoch'; allowed keys in the top level: betas, epochs, name, optim, shards"),
        ({"shards": "s", "optim": {"name": "rmsprop"}}, "invalid value 'rmsprop' for optim.name; allowed values: sgd, adam, adamw"),
        ({"shards": "s", "epochs": "three"}, "invalid value 'three' for epochs; expected an integer"),
        ({"shards": "s", "epochs": True}, "expected an integer"),
        ({"shards": "s", "optim": {"lr": -1}}, "optim: lr must be > 0, got -1.0"),
        ({"shards": "s", "optim": {"nesterov": "yes"}}, "optim.nesterov; expected true or false"),
        ({"shards": "s", "betas": [0.9]}, "expected 2 items"),
        ({}, "missing required key 'shards'"),
        ({"shards": "s", "optim": {"lr": float("nan")}}, "invalid value nan for optim.lr; expected a finite number"),
        ({"shards": "s", "optim": {"lr": ".inf"}}, "invalid value '.inf' for optim.lr; expected a finite number"),
        ({"shards": "s", 1: "a"}, "unknown key 1; allowed keys"),  # YAML keys need not be strings
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(UserError, match=None) as info:
        from_dict(Cfg, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_scalars():
    out = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "optim.lr=0.01", "run.name=my run"])
    assert out == {"train": {"epochs": 5}, "optim": {"lr": 0.01}, "run": {"name": "my run"}}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(UserError, match="'epochs' is not a section"):
        apply_overrides({"train": {"epochs": 1}}, ["train.epochs.x=1"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_yaml(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match="invalid YAML"):  # safe_load refuses arbitrary objects
        load_yaml(evil)
    with pytest.raises(UserError, match=r"invalid YAML \(line 3, column 6\): expected ',' or '\]'"):
        bad.write_text("train:\n  epochs: [1, 2\nmodel: x\n")
        load_yaml(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_yaml(latin)
    with pytest.raises(UserError, match="is a directory"):
        load_yaml(tmp_path)


@pytest.mark.parametrize("text, expected", [("256MB", 256_000_000), ("1GiB", 2**30), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(UserError, match="invalid size '12 parsecs'"):
        parse_size("12 parsecs")
