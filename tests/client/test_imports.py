from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_imports_neither_torch_nor_transformers():
    code = (
        "import json, sys, client, client.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def _last_line_on_stderr(code: str, **environment: str) -> str:
    env = {name: value for name, value in os.environ.items() if name != "GRPC_VERBOSITY"} | environment
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return result.stderr.splitlines()[-1]


# gRPC's log level as the command leaves it, whether grpc was imported before the command ran, and after.
_GRPC_LOG_LEVEL_OF_THE_COMMAND = (
    "import os, sys, client; from client.__main__ import main; "
    "imported_before = 'grpc' in sys.modules; sys.argv = ['rerank-client', '--help']; "
    "exec('try: main()\\nexcept SystemExit: pass'); "
    "print(os.environ.get('GRPC_VERBOSITY'), imported_before, 'grpc' in sys.modules, file=sys.stderr)"
)


def test_the_command_sets_grpc_log_level_before_grpc_is_imported():
    # gRPC core reads GRPC_VERBOSITY once, on import: its INFO lines (a GOAWAY from a stopping sidecar) must
    # not join a command's one-line error. Importing the package imports nothing of grpc.
    assert _last_line_on_stderr(_GRPC_LOG_LEVEL_OF_THE_COMMAND) == "ERROR False True"
    assert _last_line_on_stderr(_GRPC_LOG_LEVEL_OF_THE_COMMAND, GRPC_VERBOSITY="DEBUG") == "DEBUG False True"


def test_the_package_names_load_on_first_use():
    code = (
        "import sys, client; [getattr(client, name) for name in client.__all__]; "
        "print(client.RerankClient.__module__, file=sys.stderr)"
    )
    assert _last_line_on_stderr(code) == "client.sidecar_client"
