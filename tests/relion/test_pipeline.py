"""default_pipeline.star in RELION 5 / 4.0 / 3.1 formats: round trips, edits, RELION's lock, concurrency."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import starfile

from relion_dynamight.errors import InputError
from relion_dynamight.relion.pipeline import (
    PipelineLockError,
    format_pipeline,
    parse_pipeline,
    read_pipeline,
    update_pipeline,
)

from pipelines import RELION4, RELION5, RELION31  # noqa: E402

SAMPLES = {"5": RELION5, "4": RELION4, "3.1": RELION31}


@pytest.mark.parametrize("version", ["5", "4", "3.1"])
def test_round_trip_keeps_version_and_content(version: str, tmp_path: Path) -> None:
    pipe = parse_pipeline(SAMPLES[version])
    assert pipe.version == version
    text = format_pipeline(pipe)
    again = parse_pipeline(text)
    assert again == pipe
    assert format_pipeline(again) == text
    (tmp_path / "default_pipeline.star").write_text(text)
    tables = starfile.read(tmp_path / "default_pipeline.star", always_dict=True)
    assert set(tables) >= {"pipeline_general", "pipeline_processes", "pipeline_nodes", "pipeline_output_edges"}
    assert len(tables["pipeline_processes"]) == len(pipe.processes)
    depth = "rlnPipeLineNodeTypeLabelDepth" in tables["pipeline_nodes"].columns
    assert depth == (version == "5")
    assert ("# version 50001" in text) == (version == "5")


def test_relion5_sample_values() -> None:
    pipe = parse_pipeline(RELION5)
    assert pipe.job_counter == 13
    assert pipe.process("DynaMight/job012").alias == "DynaMight/flex/"
    assert pipe.process("DynaMight/job012/").status == "Running"
    assert ("Refine3D/job010/run_class001.mrc", "DynaMight/job012/") in pipe.input_edges


@pytest.mark.parametrize("version, ptype, status, parts, half", [
    ("5", "dynamight", "Succeeded", "ParticleGroupMetadata.star.relion.refine3d",
     "DensityMap.mrc.relion.halfmap.dynamight"),
    ("4", "relion.external", "Succeeded", "ParticlesData.star.relion.refine3d", "DensityMap.mrc.halfmap"),
    ("3.1", "99", "2", "3", "10"),
])
def test_edits_use_the_files_own_types(version: str, ptype: str, status: str, parts: str, half: str) -> None:
    pipe = parse_pipeline(SAMPLES[version])
    pipe.add_process("DynaMight/job020/", "dynamight", "Running")
    pipe.add_input_edge("X/job009/run_data.star", "ParticleGroupMetadata.star.relion.refine3d", "DynaMight/job020")
    pipe.set_status("DynaMight/job020/", "Succeeded")
    pipe.add_output_edge("DynaMight/job020/", "DynaMight/job020/backprojection/map_half1.mrc",
                         "DensityMap.mrc.relion.halfmap.dynamight")
    again = parse_pipeline(format_pipeline(pipe))
    assert again.version == version
    proc = again.process("DynaMight/job020/")
    assert (proc.type, proc.status) == (ptype, status)
    assert again.status_label(proc) == "Succeeded"
    assert again.node("X/job009/run_data.star").type == parts
    assert again.node("DynaMight/job020/backprojection/map_half1.mrc").type == half
    # adding the same node/edge twice changes nothing
    n_nodes, n_edges = len(again.nodes), len(again.input_edges)
    again.add_input_edge("X/job009/run_data.star", "ParticleGroupMetadata.star.relion", "DynaMight/job020/")
    assert (len(again.nodes), len(again.input_edges)) == (n_nodes, n_edges)


def test_minimal_and_empty_pipelines() -> None:
    minimal = parse_pipeline("data_pipeline_general\n_rlnPipeLineJobCounter 1\n")
    assert minimal.job_counter == 1 and minimal.processes == []
    assert parse_pipeline("# version 50001\ndata_pipeline_general\n_rlnPipeLineJobCounter 4\n").version == "5"


@pytest.mark.parametrize("text, words", [
    ("# version 40007\ndata_pipeline_general\n_rlnPipeLineJobCounter 1\n", "unknown pipeline version"),
    ("data_something_else\n_rlnFoo 1\n", "no data_pipeline_general"),
    ("data_pipeline_general\n_rlnPipeLineJobCounter x\n", "not a number"),
    (RELION5.replace("_rlnPipeLineProcessAlias #2", "_rlnPipeLineProcessNickname #2"), "lacks column"),
])
def test_bad_pipeline_files_give_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(InputError, match=words) as info:
        parse_pipeline(text)
    assert "\n" not in str(info.value)


def test_update_takes_and_releases_relions_lock(tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text(RELION5)
    seen: list[bool] = []

    def edit(pipe):
        seen.append((tmp_path / ".relion_lock" / "lock_default_pipeline.star").is_file())
        pipe.job_counter += 1

    update_pipeline(tmp_path, edit)
    assert seen == [True]
    assert not (tmp_path / ".relion_lock").exists()
    assert read_pipeline(tmp_path).job_counter == 14
    assert (tmp_path / ".pipeline_has_changed").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_lock_is_released_when_the_edit_fails(tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text(RELION5)

    def edit(pipe):
        pipe.job_counter = 99
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        update_pipeline(tmp_path, edit)
    assert not (tmp_path / ".relion_lock").exists()
    assert (tmp_path / "default_pipeline.star").read_text() == RELION5  # untouched


def test_stale_lock_gives_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text(RELION5)
    (tmp_path / ".relion_lock").mkdir()
    (tmp_path / ".relion_lock" / "lock_default_pipeline.star").write_text("crashed GUI\n")
    start = time.monotonic()
    with pytest.raises(PipelineLockError) as info:
        update_pipeline(tmp_path, lambda p: None, retries=3, wait_s=0.05)
    message = str(info.value)
    assert time.monotonic() - start < 2
    assert ".relion_lock" in message and "rm -rf" in message and "stale" in message and "\n" not in message
    assert isinstance(info.value, InputError)
    assert (tmp_path / ".relion_lock").exists()  # somebody else's lock is never removed by us
    assert (tmp_path / "default_pipeline.star").read_text() == RELION5


def test_waits_for_a_lock_that_goes_away(tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text(RELION5)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from relion_dynamight.relion.pipeline import pipeline_lock
        with pipeline_lock({str(tmp_path)!r}, "test holder"):
            print("locked", flush=True)
            time.sleep(0.6)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    start = time.monotonic()
    update_pipeline(tmp_path, lambda p: setattr(p, "job_counter", 50), retries=40, wait_s=0.05)
    assert time.monotonic() - start > 0.2
    assert holder.wait(timeout=10) == 0
    assert read_pipeline(tmp_path).job_counter == 50


REGISTER = """
import sys, time
from pathlib import Path
from relion_dynamight.relion.project import prepare_standalone_job, finish_standalone_job
project = Path(sys.argv[1])
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
job = prepare_standalone_job(project, "dynamight", "relion_dynamight optimize-deformations ...",
                             [("Refine3D/job010/run_data.star", "ParticleGroupMetadata.star.relion.refine3d")],
                             lock_retries=400, lock_wait_s=0.01)
finish_standalone_job(project, job, "Succeeded", [(str(job / "backprojection/map_half1.mrc"),
                      "DensityMap.mrc.relion.halfmap.dynamight")], lock_retries=400, lock_wait_s=0.01)
print(job.name)
"""


@pytest.mark.parametrize("version", ["5", "3.1"])
def test_concurrent_standalone_jobs_all_register(version: str, tmp_path: Path) -> None:
    (tmp_path / "default_pipeline.star").write_text(SAMPLES[version])
    start_at = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(tmp_path), str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    names = sorted(o[0].strip() for o in outs)
    assert len(set(names)) == 4
    pipe = read_pipeline(tmp_path)
    assert pipe.version == version
    first = SAMPLES[version] and parse_pipeline(SAMPLES[version]).job_counter
    expected = [f"DynaMight/job{n:03d}/" for n in range(first, first + 4)]
    ours = sorted(p.name for p in pipe.processes if p.name.startswith("DynaMight/") and
                  p.name not in [q.name for q in parse_pipeline(SAMPLES[version]).processes])
    assert ours == expected and [n.rstrip("/").split("/")[-1] for n in expected] == names
    assert all(pipe.status_label(pipe.process(n)) == "Succeeded" for n in expected)
    assert pipe.job_counter == first + 4
    for n in expected:
        assert (n, n + "backprojection/map_half1.mrc") in pipe.output_edges
        assert ("Refine3D/job010/run_data.star", n) in pipe.input_edges
    assert not (tmp_path / ".relion_lock").exists()


def test_relion_3_1_reads_what_we_write(relion: None, tmp_path: Path) -> None:
    """Debian's relion_pipeliner 3.1.3 reads our 3.1-format file and keeps our entries."""
    (tmp_path / "default_pipeline.star").write_text("data_pipeline_general\n_rlnPipeLineJobCounter 1\n")
    from relion_dynamight.relion.project import finish_standalone_job, prepare_standalone_job

    (tmp_path / "in.star").write_text("data_\n")
    job = prepare_standalone_job(tmp_path, "dynamight", "relion_dynamight x", [("in.star", "ParticleGroupMetadata.star.relion")])
    (job / "backprojection").mkdir()
    (job / "backprojection" / "map_half1.mrc").write_text("x")
    finish_standalone_job(tmp_path, job, "Succeeded",
                          [(f"{job.relative_to(tmp_path)}/backprojection/map_half1.mrc",
                            "DensityMap.mrc.relion.halfmap.dynamight")])
    assert (tmp_path / ".Nodes" / "10" / "DynaMight" / "job001" / "backprojection" / "map_half1.mrc").exists()
    run = subprocess.run(["relion_pipeliner", "--addJob", "External", "--addJobOptions", "fn_exe == ./x.sh"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    pipe = read_pipeline(tmp_path)
    assert pipe.version == "3.1"
    assert [(p.name, p.type, p.status) for p in pipe.processes] == [
        ("DynaMight/job001/", "99", "2"), ("External/job002/", "99", "1")]
    assert pipe.node("DynaMight/job001/backprojection/map_half1.mrc").type == "10"
    assert ("DynaMight/job001/", "DynaMight/job001/backprojection/map_half1.mrc") in pipe.output_edges
