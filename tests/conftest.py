"""Shared fixtures: small configurations and a prepared embedded-data workspace."""

from __future__ import annotations

import copy
from pathlib import Path

# The tests call the library in-process and compare with `dod` commands run as subprocesses, which
# pin the numerical runtime (params.yaml's runtime block): pin this process the same way, before
# torch or numpy is imported anywhere.
from dodlib.runtime import pin

pin(1, "avx2")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from dodlib.config import deep_merge, parse_params

REPO = Path(__file__).resolve().parents[1]

# The smoke overlay: 8x8 digits, 4 tokens, a few dozen steps (also what the workflow tests run).
TINY_OVERRIDES = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())


@pytest.fixture(autouse=True)
def _single_thread():
    # Tests use tiny tensors: threading only adds overhead and noise on a 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def repo_params_raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def tiny_raw() -> dict:
    return deep_merge(repo_params_raw(), TINY_OVERRIDES)


@pytest.fixture
def tiny_params(tiny_raw):
    return parse_params(copy.deepcopy(tiny_raw))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Prepared images and latents of the tiny configuration (built once per session)."""
    from dodlib.data import prepare_data
    from dodlib.latents import extract_latents
    from dodlib.tokenizers import build_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    params = parse_params(deep_merge(repo_params_raw(), TINY_OVERRIDES))
    exp = params.base
    prepare_data(exp.data, root / "data")
    tok = build_tokenizer(exp.tokenizer)
    for split in ("train", "val"):
        extract_latents(tok, exp.data, exp.tokenizer, root / "data" / split, root / "latents" / split)
    return root


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    """A smoke workspace where Snakemake ran the whole DAG locally (its onsuccess hook records the
    outputs in dvc.lock, so DVC agrees with no hand step)."""
    from tests.workspace import make_workspace, run

    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    run(["snakemake", "--cores", "2"], ws)
    return ws
