"""The README's promises stay true: its size table, its two commands, and CI running the test command."""

import re
import subprocess
import sys

from testkit.cog_server import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()


def test_size_table_is_what_the_code_computes():
    table = re.search(r"<!-- sizes:begin -->\n(.*?)<!-- sizes:end -->", README, re.S).group(1)
    printed = subprocess.run(
        [sys.executable, "-m", "flashsd", "sizes"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert table == printed


def test_ci_runs_the_readme_test_command():
    assert "\nmake test " in README
    assert re.search(r"^make test$", (PROJECT_ROOT / ".ci" / "run").read_text(), re.M)


def test_the_main_job_command_exists_in_the_makefile():
    assert "\nmake predict PROMPT=" in README
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^predict: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)
