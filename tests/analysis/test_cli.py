"""The `uhlm` entry point as a user's shell runs it."""

import subprocess
import sys

from tests.helpers import REPO, cpu_env


def test_a_first_run_of_the_day_prints_no_third_party_notice(tmp_path):
    # ArviZ prints a refactor notice on its first import each day, keyed by a stamp in the
    # user's cache folder; an empty cache folder makes this run that first import.
    env = cpu_env() | {"XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from analysis.cli import main; "
         "sys.exit(main(['fit', '--help']))"],
        env=env, cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert "usage: uhlm fit" in done.stdout
    assert (tmp_path / "arviz").is_dir(), "the notice's stamp folder moved; update this test"
    assert done.stderr == ""
