"""scripts/regenerate_leaderboards.sh: the published grid it runs, per suite (a dry run)."""

import os
import subprocess
import sys
from pathlib import Path

from test_text8_methods import KNOWN_GAPS

from atmbench import registry

SCRIPT = Path(__file__).parents[1] / "scripts" / "regenerate_leaderboards.sh"


def test_default_grid_is_the_registry_per_suite(tmp_path):
    env = dict(os.environ, ATMBENCH_HOME=str(tmp_path / "home"), OUT=str(tmp_path / "out"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(RUN_ARGS="--dry-run", SEEDS="0")
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    grids = dict(line.split(": ", 1) for line in lines if line.startswith(("digits8: ", "text8: ")))
    digits8 = grids["digits8"].split(",")
    assert set(registry.methods()) < set(digits8)  # every method, no alias twice
    assert "atm" in digits8 and "lines" not in digits8  # lines only refines a merge
    assert {"ta+atm", "ties+atm", "tsv+atm", "ta+lines", "ties+lines", "tsv+lines"} < set(digits8)
    # text8 leaves out exactly the methods that do not run on a language model yet
    assert grids["text8"].split(",") == [s for s in digits8 if s not in KNOWN_GAPS]
    assert (tmp_path / "out" / "vision8-ViT-B-32-reported.md").exists()
