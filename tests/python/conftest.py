"""Fixtures of the Python binding tests: the generated module next to the
built library, the default model and the made-up demo users.

The module is the committed one (bindings/python/generated/nextquill.py);
UniFFI's loader looks for the library in the module's own folder, so both are
copied into a temporary folder that goes first on sys.path.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "bindings" / "python" / "generated" / "nextquill.py"
LIBRARY = Path(os.environ.get("NEXTQUILL_LIB", ROOT / "target" / "release" / "libnextquill.so"))
MODEL = Path(
    os.environ.get("NEXTQUILL_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
)
CLI = Path(os.environ.get("NEXTQUILL_CLI", ROOT / "target" / "release" / "nextquill"))
# Three invented reviewers, written for the CLI's demo (no real person's text).
DEMO_USERS = ROOT / "src" / "cli" / "demo_users.jsonl"

_loaded = tempfile.mkdtemp(prefix="nextquill-py-")
for needed, fix in [
    (MODULE, "run scripts/bindings.sh"),
    (LIBRARY, "run cargo build --release --lib"),
    (MODEL, "run models/fetch.sh"),
]:
    if not needed.exists():
        raise RuntimeError(f"{needed} is missing; {fix}")
shutil.copy(MODULE, _loaded)
shutil.copy(LIBRARY, _loaded)
sys.path.insert(0, _loaded)

import nextquill  # noqa: E402  (the copy above must come first)


@pytest.fixture(scope="session")
def nq():
    """The generated module."""
    return nextquill


@pytest.fixture(scope="session")
def demo_jsonl():
    """The demo users' history as JSONL text."""
    return DEMO_USERS.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def demo_users(demo_jsonl):
    """The demo users by id: their items, oldest first."""
    users = {}
    for line in demo_jsonl.splitlines():
        record = json.loads(line)
        users[record["user_id"]] = sorted(record["history"], key=lambda h: h["timestamp"])
    return users


@pytest.fixture(scope="session")
def model_path():
    return str(MODEL)


@pytest.fixture(scope="session")
def cli_path():
    if not CLI.exists():
        raise RuntimeError(f"{CLI} is missing; run cargo build --release")
    return str(CLI)


def open_engine(nq, directory, **config):
    """An engine over a fresh store in `directory`, 2 threads unless told."""
    config.setdefault("threads", 2)
    return nq.NextquillEngine.open(
        str(Path(directory) / "history.sqlite3"), str(MODEL), nq.EngineConfig(**config)
    )
