"""The launch folder is data, not code: ``python -m trainer`` run in a folder imports
nothing from it (issue 14 item 14).

``python -m`` puts the current folder first on ``sys.path`` and Hydra imports every
module of every ``hydra_plugins`` folder on it, so a ``hydra_plugins/x.py`` lying in
the folder a job was started from ran inside the job (the ``trainer`` script did not).
The plugins the project installs (its sweeper, the joblib, submitit and Ray launchers:
``tests/test_sweeper.py``, ``tests/test_launchers.py``) are found where they are installed.
"""

from __future__ import annotations

import pytest

from conftest import all_runs, store_client

pytestmark = pytest.mark.slow

# A Hydra plugin of the folder, and a module named like one the CLI imports (rich), which
# would shadow it: each writes a marker file when imported.
PLANTED = ["hydra_plugins/x.py", "rich.py"]


@pytest.mark.parametrize("name", PLANTED)
def test_issue14_item14_python_m_trainer_runs_no_code_from_the_launch_folder(run_cli, tmp_path,
                                                                             name):
    marker = tmp_path / "MARKER"
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text("
                                 f"'imported {name}')\n")
    proc = run_cli("+experiment=smoke", "trainer.num_steps=20", "gradcheck.every_steps=0",
                   "trainer.checkpoints=false")
    assert not marker.exists(), proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = all_runs(store_client(tmp_path))
    assert run.info.status == "FINISHED"
    assert run.data.tags["launch_dir"] == str(tmp_path)  # the store still follows the folder


def test_issue14_item14_launcher_jobs_import_nothing_from_the_launch_folder(run_cli, tmp_path):
    """submitit's job process (``python -m submitit.core._submit``, started in the launch
    folder) scans Hydra's plugins again: it ran the folder's hydra_plugins/x.py too."""
    marker = tmp_path / "MARKER"
    (tmp_path / "hydra_plugins").mkdir()
    (tmp_path / "hydra_plugins" / "x.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    proc = run_cli("-m", "+experiment=smoke", "trainer.num_steps=20", "gradcheck.every_steps=0",
                   "trainer.checkpoints=false", "hydra/launcher=submitit_local")
    assert not marker.exists(), proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = all_runs(store_client(tmp_path))
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # parent, member
    assert len(list(tmp_path.glob("multirun/*/*/.submitit/*/*_0_result.pkl"))) == 1
