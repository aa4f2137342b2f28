"""Search records are checked when read: a damaged one (valid JSON of the wrong shape, a JSON list, a truncated file)
is reported in one warning and left out, sweep.py --status still reports the others, and slurm_train.py --local
--resume quarantines it and finishes the search with the search's own number of workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_script
from test_search import SPACE, make_search, records

from support.clusters.plan import job_start, plan_job
from support.clusters.profiles import load_clusters
from support.search import records as search_records
from support.search.launch import render_search_script

DAMAGE = {3: "[]", 4: {"best": "abc"}, 5: {"history": None}, 6: '{"number": 6, "na'}


@pytest.mark.slow
def test_damaged_records_are_skipped_by_status_and_quarantined_by_a_resume(tmp_path: Path) -> None:
    search_dir = make_search(tmp_path / "search", {"method": "random", "parameters": SPACE}, 8, ["--epochs=2"])
    generic = plan_job(load_clusters().get("generic"), {}, check_environment=False)
    (search_dir / "job.sbatch").write_text(render_search_script(  # 2 workers
        search_dir, "#SBATCH --array=0-1\n" + job_start(generic, local=True), REPO))
    owner = search_records.owner_identity(0)
    for _ in range(6):
        record = search_records.claim_or_propose(search_dir, owner)
        search_records.write_record(search_dir, {**record, "state": "finished", "best": 1.0})
    for number, damage in DAMAGE.items():
        path = search_records.record_path(search_dir, number)
        good = json.loads(path.read_text())
        path.write_text(damage if isinstance(damage, str) else json.dumps({**good, **damage}))

    status = run_script("sweep.py", "--status", str(search_dir))
    warnings = [line for line in status.stderr.splitlines() if line.startswith("warning: skipping")]
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr[-2000:]
    assert len(warnings) == 4 and all(line.count("\n") == 0 for line in warnings), status.stderr
    assert 'its "best" is "abc", not int/float/null' in status.stderr and "holds a JSON list" in status.stderr
    assert 'its "history" is null' in status.stderr

    resumed = run_script("slurm_train.py", "--local", "--resume", str(search_dir), timeout=120)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stdout + resumed.stderr
    assert "2 new worker(s) for the search" in resumed.stdout, resumed.stdout  # search.json's job, not 4 workers
    assert sorted(path.name for path in search_dir.glob("*.quarantined")) == [
        f"run-000{n}.json.quarantined" for n in DAMAGE]
    # The search reaches its count of 8 runs (before: 4, the quarantined counted as runs), and no new run took a
    # damaged one's number.
    assert [r["number"] for r in records(search_dir)] == [1, 2, 7, 8, 9, 10, 11, 12]
    assert all(r["state"] == "finished" for r in records(search_dir))
