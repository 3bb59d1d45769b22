"""envflags: a variable is checked as its flag is, since argparse never checks a default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from envflags import add_settings_arguments, settings_from


@dataclass(frozen=True, kw_only=True)
class Example:
    colour: str = field(default="red", metadata={"help": "A colour.", "choices": ("red", "blue")})
    seconds: float = field(default=1.0, metadata={"help": "A duration."})


def parsed(argv: list[str], environ: dict[str, str]) -> Example:
    parser = argparse.ArgumentParser(prog="example")
    add_settings_arguments(parser, Example, environ, env_prefix="EXAMPLE_")
    return settings_from(parser.parse_args(argv), Example)


def test_valid_variables_and_flags_parse():
    assert parsed([], {"EXAMPLE_COLOUR": "blue", "EXAMPLE_SECONDS": "2.5"}) == Example(
        colour="blue", seconds=2.5
    )
    assert parsed(["--colour", "red", "--seconds", "1e3"], {"EXAMPLE_COLOUR": "blue"}).seconds == 1000.0


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"EXAMPLE_COLOUR": "green"}, "EXAMPLE_COLOUR='green' is not one of: red, blue"),
        (["--colour", "green"], {}, "invalid choice: 'green'"),
        ([], {"EXAMPLE_SECONDS": "nan"}, "EXAMPLE_SECONDS='nan' is not a finite number"),
        ([], {"EXAMPLE_SECONDS": "-inf"}, "EXAMPLE_SECONDS='-inf' is not a finite number"),
        ([], {"EXAMPLE_SECONDS": "soon"}, "EXAMPLE_SECONDS='soon' is not a valid float"),
        (["--seconds", "inf"], {}, "argument --seconds: 'inf' is not a finite number"),
        (["--seconds=-Infinity"], {}, "argument --seconds: '-Infinity' is not a finite number"),
        (["--seconds", "NaN"], {}, "argument --seconds: 'NaN' is not a finite number"),
        (["--seconds", "soon"], {}, "argument --seconds: invalid float value: 'soon'"),
    ],
)
def test_a_bad_variable_or_flag_is_a_usage_error_naming_it(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as raised:
        parsed(argv, environ)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
