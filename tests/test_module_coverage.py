"""Every module of the package has a test file of its own name (``test_<module>.py`` in the folder of its
subpackage), or is listed below with the test files that exercise it and the text by which they do."""

from __future__ import annotations

from pathlib import Path

import relion_dynamight

PACKAGE = Path(relion_dynamight.__file__).parent
TESTS = Path(__file__).parent

#: module → [(test file, text in it that shows it runs the module)]
EXERCISED_BY: dict[str, list[tuple[str, str]]] = {
    "analysis.deformation_errors": [("training/test_training_truth.py", "deformation_errors(")],
    "analysis.errors": [("jobs/test_explore_cli.py", '"--half-set", "0"')],
    "analysis.explore_figures": [("jobs/test_explore.py", "pc1.gif")],
    "analysis.figures": [("jobs/test_optimize_deformations.py", "loss_curves.png")],
    "analysis.latent": [("jobs/test_explore_gui.py", "lat.deformed_maps"), ("jobs/test_explore_cli.py", "--mask-file")],
    "analysis.phantom": [("jobs/test_simulate.py", "phantom")],
    "analysis.phantom_images": [("analysis/test_oracle.py", "clean_images")],
    "analysis.report": [("jobs/test_explore_cli.py", "report.html"),
                        ("jobs/test_optimize_deformations.py", "report.html")],
    "analysis.subsets": [("jobs/test_explore.py", "subsets"), ("jobs/test_explore_gui.py", "save_subset")],
    "cli": [("jobs/test_explore_cli.py", "from relion_dynamight.cli import cli")],
    "errors": [("relion/test_star.py", "InputError")],
    "gui.viewer": [("jobs/test_explore_gui.py", "relion_dynamight.gui.viewer")],
    "imaging.ctf": [("imaging/test_projection.py", "ctf")],
    "imaging.deformed_backprojection": [("imaging/test_deformed_backprojection.py", "DeformedBackprojector")],
    "imaging.fourier": [("jobs/test_reconstruct.py", "fsc")],
    "imaging.geometry": [("imaging/test_projection.py", "euler")],
    "imaging.grouping": [("imaging/test_deformed_backprojection.py", "group")],
    "imaging.warp": [("imaging/test_deformed_backprojection.py", "warp")],
    "jobs.backprojection": [("jobs/test_deformed_backprojection_job.py", "deformable-backprojection")],
    "jobs.explore": [("jobs/test_explore.py", "from relion_dynamight.jobs.explore import")],
    "jobs.external": [("relion/test_pipeliner.py", "test_simulate_runs_as_external_job_and_declares_nodes")],
    "jobs.install_gui": [("relion/test_relion_gui.py", "install-relion-gui")],
    "jobs.optimize_inverse": [("jobs/test_deformed_backprojection_job.py", "optimize-inverse-deformations")],
    "jobs.runner": [("relion/test_jobdir.py", "RELION_JOB_EXIT")],
    "logs": [("jobs/test_optimize_deformations.py", "particles/s")],
    "model.decoder": [("model/test_model_networks.py", "DeformationDecoder")],
    "model.encoder": [("model/test_model_networks.py", "Encoder")],
    "model.noise": [("model/test_losses.py", "noise")],
    "model.render": [("model/test_consensus.py", "render")],
    "model.rigid": [("model/test_rigid_bodies.py", "RigidBodyDecoder")],
    "parallel.device": [("jobs/test_optimize_deformations.py", '"--gpu-id", "cpu"')],
    "parallel.mpi": [("jobs/test_optimize_deformations.py", "mpiexec")],
    "relion.atomic_model": [("model/test_consensus.py", "from_atomic_model")],
    "relion.external": [("relion/test_pipeliner.py", "parse_external_args")],
    "relion.mrc": [("jobs/test_reconstruct.py", "mrc")],
    "relion.output_checks": [("relion/test_jobdir.py", "test_no_success_with_garbage_outputs")],
    "relion.particle_checks": [("jobs/test_bad_inputs.py", "catalogue")],
    "relion.relion5_lines": [("relion/test_relion5_command_lines.py", "new_job(")],
    "relion.schemes": [("relion/test_relion_gui.py", "Schemes")],
    "relion.watchdog": [("relion/test_jobguard.py", "watchdog")],
    "tab_options": [("jobs/test_tab_options.py", "ORIGINAL_OPTIONS")],
    "training.config": [("training/test_checkpoint.py", "config")],
    "training.halves": [("training/test_training_halves.py", "split")],
    "training.half": [("training/test_training_learning.py", "HalfModel")],
    "training.inverse": [("jobs/test_deformed_backprojection_job.py", "inverse")],
    "training.live": [("jobs/test_optimize_deformations.py", "--live-every")],
    "training.outputs": [("jobs/test_optimize_deformations.py", "latent_space.star"),
                         ("model/test_rigid_bodies.py", "rigid_transforms.star")],
    "training.reference_frame": [("jobs/test_deformed_backprojection_job.py", "standard_half")],
    "training.rng": [("training/test_determinism.py", "seed")],
    "training.schedule": [("training/test_training_truth.py", "Schedule(")],
    "training.trainer": [("training/test_determinism.py", "optimize-deformations")],
}


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            continue
        out.append(".".join(parts) if parts[-1] != "__init__" else "")
    return [m for m in out if m]


def own_test(module: str) -> Path | None:
    leaf = module.split(".")[-1]
    found = [p for p in TESTS.rglob(f"test_{leaf}.py") if "__pycache__" not in p.parts]
    return found[0] if found else None


def test_every_module_is_tested_by_name_or_listed() -> None:
    missing = [m for m in modules() if own_test(m) is None and m not in EXERCISED_BY]
    assert missing == [], f"modules without a test: {missing}; add tests/<package>/test_<module>.py or list them"


def test_the_listed_tests_exist_and_exercise_the_module() -> None:
    wrong = []
    for module, uses in EXERCISED_BY.items():
        assert module in modules(), f"{module} is listed but no longer exists"
        for name, text in uses:
            path = TESTS / name
            if not path.is_file() or text not in path.read_text():
                wrong.append(f"{module}: {name} ({text!r})")
    assert wrong == []
