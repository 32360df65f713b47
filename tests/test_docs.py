"""The defaults the docs state are the defaults the code uses (read from cryo_drvae/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from cryo_drvae.cli import main
from cryo_drvae.config import DIAMETER_FRACTION, RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: ROOT / name for name in ("README.md", "docs/cli.md", "docs/relion.md")}
#: Flags every one of those documents must give a default for.
REQUIRED = ("--K", "--iter", "--particle_diameter", "--balance", "--tolerance", "--offset_range", "--angpix")


def config_defaults() -> dict[str, object]:
    """Flag (every spelling of classify's options) -> the config default of the field it sets."""
    cfg = RunConfig()
    values = {**vars(cfg.data), **vars(cfg.train), **vars(cfg.cluster), "seed": cfg.seed, "threads": cfg.threads}
    out: dict[str, object] = {}
    for param in main.commands["classify"].params:
        if isinstance(param, click.Option) and param.name in values:
            for flag in param.opts:
                out[flag] = values[param.name]
    return out


def documented_defaults(text: str) -> dict[str, str]:
    """Flag -> the text of the 'default' column, from every markdown table that has one."""
    found: dict[str, str] = {}
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            lowered = [c.lower() for c in cells]
            column = lowered.index("default") if "default" in lowered else -1
            continue
        if column < 0 or set(cells[0]) <= {"-", " "} or len(cells) <= column:
            continue
        for flag in re.findall(r"`(--[A-Za-z_]+)", cells[0]):
            found[flag] = cells[column]
    return found


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_documented_defaults_are_the_config_defaults(doc):
    documented = documented_defaults(DOCS[doc].read_text())
    defaults = config_defaults()
    missing = [flag for flag in REQUIRED if flag not in documented]
    assert not missing, f"{doc} gives no default for {missing}"
    checked = 0
    for flag, text in documented.items():
        value = defaults.get(flag)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not text:
            continue
        number = re.match(r"[-+]?\d+(\.\d+)?", text)
        assert number, f"{doc}: {flag} default {text!r} is not a number (config: {value})"
        assert float(number.group()) == pytest.approx(value), f"{doc}: {flag} default {text} but config says {value}"
        checked += 1
    assert checked >= len(REQUIRED)


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_diameter_rule_is_the_one_processing_uses(doc):
    text = DOCS[doc].read_text()
    rules = re.findall(r"(\d+(?:\.\d+)?)\s*(%|x)\s*(?:of\s+)?(?:the\s+)?box", text)
    stated = [float(v) / (100 if unit == "%" else 1) for v, unit in rules
              if float(v) not in (10.0,)]           # 10 % of the box is the shift range
    assert stated, f"{doc} does not say what particle_diameter 0 means"
    assert all(v == pytest.approx(DIAMETER_FRACTION) for v in stated), f"{doc}: {rules}"


def test_help_defaults_come_from_the_config():
    command = main.commands["classify"]
    defaults = config_defaults()
    for param in command.params:
        if isinstance(param, click.Option) and param.opts[0] in defaults and not (param.is_flag or param.required):
            assert param.default == defaults[param.opts[0]], param.opts
