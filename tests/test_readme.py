"""Every command of the README's "Using the pipeline" table runs: Snakemake ones as dry runs in a
fresh workspace, `dod` ones through their `--help` (their real runs, and the other
DVC commands on a finished workspace, are covered in test_workflow.py)."""

import re
import shlex

import pytest

from tests.conftest import REPO
from tests.workspace import make_workspace, run


def table_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Using the pipeline", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in section.splitlines() if line.startswith("|") and "`" in line]
    return [cmd for row in rows for cmd in re.findall(r"`([^`]+)`", row.split("|")[2])]


def test_the_table_lists_the_commands_users_run():
    commands = table_commands()
    assert "snakemake --cores 2" in commands and "dvc repro" in commands
    assert not any(c.startswith("snakemake sample_stage") for c in commands)  # wildcard rules are no targets


@pytest.mark.slow
def test_every_snakemake_and_dod_command_of_the_table_runs(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    checked = 0
    for command in table_commands():
        for part in command.split(" && "):
            if "<" in part:
                continue  # a pattern (`dod <stage> --help`), not a command
            argv = shlex.split(part)
            if argv[0] == "snakemake":
                run(argv + ["-n"] if "--report" not in argv else argv[:1] + ["-n", "--cores", "1"], ws)
                checked += 1
            elif argv[0] == "dod" and argv[1] != "dvc-yaml":
                run(argv[:2] + ["--help"], ws)
                checked += 1
            elif argv[:2] == ["dvc", "status"]:  # `dvc repro --dry` needs the data: test_workflow runs it
                run(argv, ws)
                checked += 1
    assert checked >= 9
