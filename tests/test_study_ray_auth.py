"""The private Ray instance of ``--executor ray`` runs with token authentication.

While it runs, a client without the token (another account on the machine reaching the loopback port)
is refused; one with the token (any process of the instance) connects. The token is in a file of the
instance's own folder, mode 0600 in a 0700 folder, never in ``~/.ray``; all is gone after the run.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from overtone.study.executors import ExecutorOptions

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra")]
CONNECT = "import ray; ray.init(address={!r}); print('connected')"


def connect(address: str, **auth: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | auth
    return subprocess.run([sys.executable, "-c", CONNECT.format(address)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_private_instance_refuses_clients_without_its_token():
    from overtone.study.ray_executor import TOKEN_FILE, RayExecutor

    default_token = Path.home() / ".ray" / "auth_token"
    had_default = default_token.exists()
    executor = RayExecutor(ExecutorOptions())
    with executor._connected():
        import ray

        address = ray.get_runtime_context().gcs_address
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
        assert token.name == TOKEN_FILE and os.environ["RAY_AUTH_MODE"] == "token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
        assert address.startswith("127.0.0.1:")
        refused = connect(address, RAY_AUTH_MODE="disabled")
        assert refused.returncode != 0 and "connected" not in refused.stdout
        accepted = connect(address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token.read_text())
        assert accepted.returncode == 0 and "connected" in accepted.stdout, accepted.stderr[-2000:]
    assert not token.parent.exists()
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ
    assert default_token.exists() == had_default, "Ray wrote a token file in ~/.ray"
