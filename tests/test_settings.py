"""Settings: flags beat environment variables beat defaults, and the README documents every one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from envflags import env_name, flag_name, settings_table
from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.serving.runtime import (
    batch_pair_limit,
    batch_token_budget,
    batch_workers,
    served_batch_tokens,
    serving_workers,
)
from sidecar.settings import ENV_PREFIX, ModelEntry, Settings, model_entries, parse_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_environment_and_flags():
    assert parse_settings([], {}).port == 50051
    assert parse_settings([], {"RERANK_PORT": "6000"}).port == 6000
    assert parse_settings(["--port", "7000"], {"RERANK_PORT": "6000"}).port == 7000
    settings = parse_settings(
        ["--grace-period", "2.5"], {"RERANK_MODEL": "/models/x", "RERANK_MAX_BATCH_PAIRS": "8"}
    )
    assert settings.model == "/models/x"
    assert settings.max_batch_pairs == 8
    assert settings.grace_period == 2.5
    http = parse_settings(["--http-metrics"], {"RERANK_HTTP_PORT": "8080"})
    assert (http.http_port, http.http_metrics, parse_settings([], {}).http_port) == (8080, True, 0)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--max-batch-pairs", "-1"], {}),
        (["--max-batch-tokens", "-1"], {}),
        (["--batch-workers", "-1"], {}),
        (["--engine", "warp-drive"], {}),
        ([], {"RERANK_PORT": "not-a-number"}),
        (["--max-batch-pairs", "64", "--max-queued-pairs", "32"], {}),
        (["--http-metrics"], {}),
        ([], {"RERANK_HTTP_PORT": "9400"}),
        (["--http-port", "-1"], {}),
    ],
)
def test_invalid_settings_exit_with_a_usage_error(argv: list[str], environ: dict[str, str], capsys):
    with pytest.raises(SystemExit) as raised:
        parse_settings(argv, environ)
    assert raised.value.code == 2
    assert "error" in capsys.readouterr().err


def test_batch_token_budget_defaults_by_device_and_fits_one_full_input():
    assert parse_settings([], {}).max_batch_tokens == 0  # picked for the device at load
    assert batch_token_budget(0, "cpu", 512) == 4096
    assert batch_token_budget(0, "cuda", 512) == 32768
    assert batch_token_budget(0, "cuda:1", 512) == 32768
    assert batch_token_budget(0, "cpu", 8192) == 8192  # a long-context model still fits one input
    assert batch_token_budget(2048, "cpu", 512) == 2048  # an operator's value is kept as given


def test_an_engine_that_serves_as_fast_with_smaller_batches_gets_them_unless_the_operator_set_a_budget():
    class Small(Engine):
        preferred_batch_tokens = 2048

        def forward(self, batch: TokenBatch) -> np.ndarray:
            raise NotImplementedError

    class Plain(Small):
        preferred_batch_tokens = None

    small, plain = Small(precision="fp32", device="cpu"), Plain(precision="fp32", device="cpu")
    assert served_batch_tokens(0, 4096, small, 512) == 2048
    assert served_batch_tokens(0, 4096, plain, 512) == 4096
    assert served_batch_tokens(0, 8192, small, 8192) == 8192  # a long-context model still fits one input
    assert served_batch_tokens(0, 1024, small, 512) == 1024  # never above the device's budget
    assert served_batch_tokens(4096, 4096, small, 512) == 4096  # an operator's value is kept as given


def test_batch_pairs_default_by_device():
    assert parse_settings([], {}).max_batch_pairs == 0  # picked for the device at load
    assert batch_pair_limit(0, "cpu") == 32
    assert batch_pair_limit(0, "cuda:0") == 256
    assert batch_pair_limit(8, "cuda") == 8


def test_batch_workers_default_by_device_and_engine():
    assert parse_settings([], {}).batch_workers == 0  # picked for the device at load
    assert batch_workers(0, "cpu", 2) == 2
    assert batch_workers(0, "cpu", 1) == 1
    assert batch_workers(0, "cuda", 16) == 1  # one batch at a time on the GPU, whatever the CPU threads
    assert batch_workers(3, "cpu", 2) == 3

    class OneAtATime(Engine):
        name = "tensorrt"
        concurrent_forward = False

        def forward(self, batch):  # never called
            raise NotImplementedError

    engine = OneAtATime(precision="fp16", device="cuda")
    assert serving_workers(0, 2, engine) == 1
    with pytest.raises(ModelLoadError, match="--batch-workers 2: the tensorrt engine runs one batch at a"):
        serving_workers(2, 2, engine)


def test_readme_lists_every_setting():
    readme = README.read_text()
    assert settings_table(Settings, ENV_PREFIX) in readme, (
        "README settings table is stale: paste the output of `python -m sidecar.settings`"
    )
    for field in dataclasses.fields(Settings):
        assert flag_name(field.name) in readme
        assert env_name(field, ENV_PREFIX) in readme


def test_models_are_named_entries_given_once_each_or_as_a_comma_separated_variable():
    by_flags = parse_settings(["--model", "small=/m/a", "--model", "/m/b"], environ={"RERANK_MODEL": "x"})
    by_variable = parse_settings([], environ={"RERANK_MODEL": "small=/m/a,/m/b"})
    assert by_flags.model == by_variable.model == "small=/m/a,/m/b"
    assert model_entries("--model", by_flags.model) == [ModelEntry("small", "/m/a"), ModelEntry("", "/m/b")]


def test_a_model_directory_with_an_equals_sign_is_a_path_not_a_name(tmp_path):
    directory = tmp_path / "run=3" / "model"
    directory.mkdir(parents=True)
    assert model_entries("--model", str(directory)) == [ModelEntry("", str(directory))]
    assert model_entries("--model", f"small={directory}") == [ModelEntry("small", str(directory))]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a b=/m/a", "letters, digits"),
        ("=/m/a", "letters, digits"),
        ("small=", "letters, digits"),
        ("small=/m/a,small=/m/b", "'small' is given to more than one model"),
    ],
)
def test_a_bad_or_repeated_model_name_stops_the_start(value: str, message: str):
    with pytest.raises(ValueError, match=message):
        Settings(model=value)
