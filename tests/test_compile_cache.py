"""JAX's persistent compilation cache (trainer/compile_cache.py), through the CLI.

A second run on the machine loads its executables from the cache and gets the
same bits; a cache folder that is corrupt or cannot be written only warns.
"""

from __future__ import annotations

from pathlib import Path

from conftest import all_runs, cli_env, store_client

from trainer.tracking import metric_history

JOB = ["+experiment=diabetes", "trainer.num_steps=300", "trainer.steps_per_call=100"]


def _run(run_cli, cwd: Path, cache: Path, *extra: str):
    cwd.mkdir()
    done = run_cli(*JOB, *extra, cwd=cwd, env=cli_env(JAX_COMPILATION_CACHE_DIR=str(cache)))
    assert done.returncode == 0, done.stderr
    (run,) = all_runs(store_client(cwd))
    client = store_client(cwd)
    curve = metric_history(client, run.info.run_id, "curves/train_loss")
    return done, run, curve


def test_second_run_hits_the_cache_and_gets_the_same_bits(run_cli, tmp_path):
    """Also with an entry that has no access-time file in the folder, as a JAX process
    without a size limit writes them (JAX's default: the benchmark scripts, a notebook):
    JAX's LRU then failed every write, with a warning per program (seen in CI logs)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_foreign-0123456789abcdef-cache").write_bytes(b"\0" * 64)
    done_cold, cold, cold_curve = _run(run_cli, tmp_path / "a", cache)
    done_warm, warm, warm_curve = _run(run_cli, tmp_path / "b", cache)
    for done in (done_cold, done_warm):
        assert "compilation cache" not in done.stderr, done.stderr
    c, w = cold.data.metrics, warm.data.metrics
    assert c["xla/compile_cache_hits"] == 0 and c["xla/compile_cache_misses"] > 0
    assert w["xla/compile_cache_misses"] == 0
    assert w["xla/compile_cache_hits"] == c["xla/compile_cache_misses"]
    assert any(cache.iterdir())
    assert warm.data.tags["compile_cache"] == str(cache)
    # a hit runs the executable the compiler made: the same bits, not merely close
    assert warm_curve == cold_curve and len(cold_curve[0]) >= 3
    for key in ("test/rmse", "test/mae", "curves/val_loss"):
        assert w[key] == c[key]
    assert w["time/compile_s"] < c["time/compile_s"]
    for m in (c, w):  # process start to the first step: more than the compile, less than all
        assert m["time/compile_s"] < m["time/startup_s"] < m["time/startup_s"] + m["time/train_s"]
    # every entry corrupted: JAX warns, compiles again, and the run is the same
    entries = [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert entries
    for p in entries:
        p.write_bytes(b"not an executable")
    done, broken, broken_curve = _run(run_cli, tmp_path / "c", cache)
    assert broken.info.status == "FINISHED"
    assert broken_curve == cold_curve
    assert broken.data.metrics["test/rmse"] == c["test/rmse"]
    assert "persistent compilation cache" in done.stderr


def test_unwritable_cache_folder_warns_and_the_run_finishes(run_cli, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    done, run, curve = _run(run_cli, tmp_path / "a", blocker / "jax")
    assert "warning: compilation cache off: cannot write the cache folder" in done.stderr
    assert str(blocker / "jax") in done.stderr and "trainer.compilation_cache_dir" in done.stderr
    assert run.info.status == "FINISHED" and len(curve[0]) >= 3
    assert run.data.tags["compile_cache"].startswith("cannot write the cache folder")
    assert run.data.metrics["xla/compile_cache_hits"] == 0


def test_cache_off(run_cli, tmp_path):
    cache = tmp_path / "cache"
    done, run, _ = _run(run_cli, tmp_path / "a", cache, "trainer.compilation_cache=false")
    assert not cache.exists()
    assert run.data.tags["compile_cache"] == "off (trainer.compilation_cache=false)"
    assert "warning" not in done.stderr
