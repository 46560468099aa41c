"""The study: the grid's configs, a whole (tiny) study end to end, kill and resume, the report remade byte for byte."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxsam import study as study_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A smoke study shrunk to what the tests need: 2 epochs of 4 steps per arm, a few cheap measures.
TINY = {
    "run.data.synthetic_train": 128,
    "run.data.synthetic_test": 64,
    "run.train.eval_batch_size": 64,
    "run.track.measures": "worst_case",
    "measure.measures": "accuracy,worst_case,lambda_max,interpolation",
    "measure.n_examples": 32,
    "measure.lanczos_iters": 3,
    "measure.ascent_steps": 2,
    "measure.interpolation_points": 3,
    "figure_measures": "surface_2d",
    "measure.surface_points": 3,
}


def study_config(size=None, **overrides):
    spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, "configs", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(size)
    c.update_from_flattened_dict(overrides)
    return c


def _flags(overrides):
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def test_the_default_grid_is_models_by_optimizers_by_sam_by_seeds():
    study = study_config()
    specs = study_lib.plan(study)
    assert len(specs) == 2 * 4 * 3
    # Seed by seed, so a partial study has every arm of the first seeds.
    assert [(s.model, s.arm, s.seed) for s in specs[:8]] == [
        (m, a, 0) for m in ("resnet18", "vgg16") for a in ("sgd", "sgd_sam", "adam", "adam_sam")
    ]
    assert specs[9].path == os.path.join("runs", "resnet18", "sgd_sam", "seed1")
    cpu = study_config("cpu")
    assert len(study_lib.plan(cpu)) == 16 and study_config("smoke").seeds == 1


def test_the_fit_grid_adds_the_original_adam_setting_on_resnet18_and_jobs_pair_base_with_sam():
    from jaxsam import jobs

    study = study_config("fit")
    specs = study_lib.plan(study)
    assert len(specs) == (2 * 4 + 2) * 3
    seed0 = [(s.model, s.arm) for s in specs if s.seed == 0]
    assert seed0[-2:] == [("resnet18", "original_adam"), ("resnet18", "original_adam_asam")]
    config = study_lib.run_config(study, specs[0])
    assert (config.data.n_train, config.train.num_epochs, config.data.crop_padding, config.model.width) == (
        5000, 40, 0, 0.125)
    assert study.measure.n_examples == 1024 and study.measure.antithetic
    # The pairs that need longer to fit train longer, base and SAM alike; the others keep 40 epochs.
    epochs = {(s.model, s.arm): study_lib.run_config(study, s).train.num_epochs for s in specs if s.seed == 2}
    assert epochs[("vgg16", "sgd")] == epochs[("vgg16", "sgd_sam")] == 80
    assert epochs[("resnet18", "original_adam")] == epochs[("resnet18", "original_adam_asam")] == 150
    assert epochs[("resnet18", "sgd")] == epochs[("resnet18", "sgd_sam")] == epochs[("vgg16", "adam_sam")] == 40
    # The report's Setting lists every arm of the plan (the extra arms too) with the epochs that differ.
    from jaxsam import report

    setting = "\n".join(report._setting(study, []))
    assert "- **Training:** 40 epochs (unless an arm below says otherwise), batch 128" in setting
    assert "  - SGD + SAM (`sgd_sam`): SGD lr 0.1, momentum 0.9, SAM ρ 0.05, 80 epochs on VGG16\n" in setting
    assert ("  - Adam + ASAM ρ=2 (original) (`original_adam_asam`): Adam lr 0.001, β = (0.9, 0.999), ASAM ρ 2, "
            "label smoothing 0.1, 150 epochs (ResNet18 only)\n") in setting
    # One job per (model, seed, base arm): the SAM run measured with its base (the interpolation needs both).
    grouped = jobs.group_jobs(specs)
    assert len(grouped) == 5 * 3 and sorted(len(j) for j in grouped) == [2] * 15
    assert [(s.arm, s.seed) for s in grouped[0]] == [("sgd", 0), ("sgd_sam", 0)]
    assert [s.arm for s in grouped[4]] == ["original_adam", "original_adam_asam"]
    alone = jobs.group_jobs(study_lib.plan(study_config("smoke", arms="sgd_sam,adam")))
    assert [[s.arm for s in j] for j in alone] == [["sgd_sam"], ["adam"]]
    # Split, every run is a job; longest first, the 150-epoch ASAM runs (cost 300) lead, then the 80-epoch VGG16
    # SGD + SAM runs (160) and the ASAM runs' bases (150); ties keep the plan's order (seed by seed).
    split = jobs.longest_first(study, jobs.group_jobs(specs, split_pairs=True))
    assert len(split) == 30 and all(len(j) == 1 for j in split)
    assert [(j[0].model, j[0].arm, j[0].seed, jobs.job_cost(study, j)) for j in split[:9]] == [
        *[("resnet18", "original_adam_asam", seed, 300) for seed in range(3)],
        *[("vgg16", "sgd_sam", seed, 160) for seed in range(3)],
        *[("resnet18", "original_adam", seed, 150) for seed in range(3)]]
    assert [jobs.job_cost(study, j) for j in split] == sorted((jobs.job_cost(study, j) for j in split), reverse=True)
    assert jobs.job_cost(study, grouped[4]) == 450 and jobs.job_cost(study, grouped[0]) == 120


def test_each_arm_gets_its_optimizer_and_the_study_overrides_apply_to_all():
    study = study_config("cpu", **{"run.train.num_epochs": 5, "arms": "sgd,adam_sam,original_adam_asam"})
    configs = {s.arm: study_lib.run_config(study, s) for s in study_lib.plan(study) if s.seed == 1}
    assert configs["sgd"].optimizer.name == "sgd" and configs["sgd"].sam.name == "none"
    assert configs["adam_sam"].optimizer.name == "adam" and configs["adam_sam"].sam.name == "sam"
    assert configs["adam_sam"].optimizer.learning_rate == 3e-3  # the cpu size's Adam rate is not clobbered
    original = configs["original_adam_asam"]
    assert (original.sam.name, original.sam.rho, original.optimizer.learning_rate, original.train.label_smoothing) == (
        "asam", 2.0, 1e-3, 0.1)
    for c in configs.values():
        assert c.train.num_epochs == 5 and c.seed == 1 and c.track.every_epochs == 1 and c.model.width == 0.125


def test_figure_measures_run_on_the_first_seed_only_and_bases_interpolate_to_their_sam_arm():
    study = study_config("cpu")
    specs = study_lib.plan(study)
    first, second = specs[0], specs[8]
    assert "surface_2d" in study_lib.measure_options(study, first).measures.split(",")
    assert "surface_2d" not in study_lib.measure_options(study, second).measures.split(",")
    partner = study_lib.interpolation_partner(specs, first)
    assert (partner.arm, partner.seed, partner.model) == ("sgd_sam", 0, "resnet18")
    assert study_lib.interpolation_partner(specs, partner) is None


def test_the_glance_table_gives_each_pair_its_intervals_bold_where_they_exclude_zero():
    from jaxsam import report

    def cell(mean, low, high, verdict):
        return dict(mean=mean, ci_low=low, ci_high=high, n=3, positive=int(mean > 0) * 3, negative=int(mean < 0) * 3,
                    verdict=verdict, level=0.95)  # fmt: skip

    pairs = {"vgg16": {"adam->adam_sam": {"test_accuracy": cell(0.5, -1.0, 2.0, "no difference detected"),
                                          "worst_case": cell(-0.2, -0.3, -0.1, "lower")}}}  # fmt: skip
    lines = report._glance_table(pairs)
    assert lines[0] == ("| network | SAM − base | seeds | test accuracy (pp) | generalization gap (pp) | "
                        "worst-case sharpness | average-case sharpness | λmax |")
    assert lines[2] == "| VGG16 | Adam + SAM − Adam | 3 | +0.50 [−1.00, 2.00] | — | **−0.20 [−0.30, −0.10]** | — | — |"


def test_measures_saved_before_the_eigen_solver_options_count_as_lanczos_measures(tmp_path):
    """A geometry.json without eigen_method (the committed :fit grid's) is measured under options choosing
    Lanczos with the same steps, whatever the restarted solver's unread options say, and not otherwise."""
    from jaxsam import files
    from jaxsam.measure import measure_options

    options = measure_options("fit")
    assert options.eigen_method == "lanczos"
    legacy = {k: v for k, v in options.to_dict().items() if not k.startswith("eigen_")}
    (tmp_path / "geometry").mkdir()
    files.write_json(str(tmp_path / "geometry" / "geometry.json"), {"options": legacy, "compare_to": None})
    assert study_lib.is_measured(str(tmp_path), options, None)
    options.eigen_tol = 1e-3  # read by the restarted solver only
    assert study_lib.is_measured(str(tmp_path), options, None)
    for field, value in (("eigen_method", "restarted"), ("lanczos_iters", 31)):
        changed = measure_options("fit")
        changed[field] = value
        assert not study_lib.is_measured(str(tmp_path), changed, None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"arms": "sgd,lion"}, "study.arms has unknown ['lion']: choose from"),
        ({"models": "resnet50"}, "study.models has unknown ['resnet50']"),
        ({"seeds": 0}, "study.seeds must be >= 1"),
        ({"arms": "sgd,sgd"}, "study.arms names an entry twice"),
        ({"figure_measures": "hessian"}, "study.figure_measures has unknown ['hessian']"),
        ({"extra_arms": "resnet50:sgd"}, "study.extra_arms has 'resnet50:sgd': use model:arm"),
        ({"extra_arms": "vgg16:lion"}, "study.extra_arms has 'vgg16:lion': use model:arm"),
        ({"extra_arms": "vgg16:sgd,vgg16:sgd"}, "study.extra_arms names 'vgg16:sgd' twice"),
        ({"pair_epochs": "vgg16:sgd"}, "study.pair_epochs has 'vgg16:sgd': the epochs must be a whole number"),
        ({"pair_epochs": "vgg16:sgd=0"}, "study.pair_epochs has 'vgg16:sgd=0': the epochs must be a whole number"),
        ({"pair_epochs": "vgg19:sgd=3"}, "study.pair_epochs has 'vgg19:sgd=3': use model:base_arm=epochs"),
        ({"pair_epochs": "vgg16:sgd_sam=3"}, "study.pair_epochs has 'vgg16:sgd_sam=3': name the base arm 'sgd'"),
        ({"pair_epochs": "vgg16:sgd=3,vgg16:sgd=4"}, "study.pair_epochs names vgg16:sgd twice"),
    ],
)
def test_bad_study_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        study_lib.plan(study_config("smoke", **overrides))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """The tiny smoke study (resnet18 sgd vs sgd_sam, one seed), run once in this process."""
    folder = str(tmp_path_factory.mktemp("study"))
    lines = []
    summary = study_lib.run_study(study_config("smoke", **TINY), folder, command="python scripts/study.py (test)",
                                  log=lines.append)  # fmt: skip
    return folder, summary, lines


@pytest.mark.xdist_group("finished_study")
def test_study_trains_measures_and_reports_every_arm(finished_study):
    folder, summary, lines = finished_study
    assert lines[0].endswith("0/4 steps (trainings + measurements) already done")
    assert [line.split("]")[0] for line in lines[1:5]] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    assert lines[-1].startswith("study done: 2/2 runs")
    assert summary["runs_done"] == summary["runs_planned"] == 2
    runs = {r["arm"]: r for r in summary["runs"]}
    for arm in ("sgd", "sgd_sam"):
        workdir = os.path.join(folder, "runs", "resnet18", arm, "seed0")
        with open(os.path.join(workdir, "geometry", "geometry.json")) as f:
            geometry = json.load(f)["splits"]["train"]
        metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        epochs = [r for r in metrics if "test_accuracy" in r]
        # The summary's numbers are the saved ones.
        assert runs[arm]["test_accuracy"] == epochs[-1]["test_accuracy"]
        assert runs[arm]["worst_case"] == geometry["worst_case"]["value"] > 0
        assert runs[arm]["lambda_max"] == geometry["lambda_max"]["eigenvalues"][0] > 0
        assert runs[arm]["train_accuracy"] == geometry["accuracy"]["accuracy"]
        assert runs[arm]["gap"] == pytest.approx(runs[arm]["train_accuracy"] - runs[arm]["test_accuracy"])
        assert [r["epoch"] for r in epochs] == [1, 2] and all(r["track_worst_case"] >= 0 for r in epochs)
        assert summary["aggregate"]["resnet18"][arm]["test_accuracy"]["n"] == 1
    # The base run interpolates to its SAM partner; figures exist and are linked from the report.
    base_geometry = json.load(open(os.path.join(folder, "runs", "resnet18", "sgd", "seed0", "geometry", "geometry.json")))
    assert base_geometry["compare_to"].endswith(os.path.join("sgd_sam", "seed0"))
    interpolation = base_geometry["splits"]["train"]["interpolation"]
    curves = [k for k, v in interpolation.items() if isinstance(v, dict) and not k.startswith("init")]
    assert curves == ["resnet18 sgd -> resnet18 sgd + sam"]
    report = open(os.path.join(folder, "report.md")).read()
    for name in ("test_accuracy", "tracked_worst_case", "interpolation", "surface_resnet18"):
        assert os.path.getsize(os.path.join(folder, "figures", f"{name}.png")) > 10_000
        assert f"![{name}](figures/{name}.png)" in report
    sgd, sam = runs["sgd"], runs["sgd_sam"]
    row = next(line for line in report.splitlines() if line.startswith("| SGD + SAM |"))
    assert row.startswith(f"| SGD + SAM | 1 | {100 * sam['test_accuracy']:.2f} | {100 * sam['train_accuracy']:.2f} |")
    assert f"{sam['worst_case']:.3g}" in row and f"{sam['lambda_max']:.3g}" in row
    delta = 100 * sam["test_accuracy"] - 100 * sgd["test_accuracy"]  # as the report computes it, in pp
    paired = summary["paired"]["resnet18"]["sgd->sgd_sam"]["test_accuracy"]
    assert paired["mean"] == delta and paired["n"] == 1 and paired["verdict"] == "no difference detected"
    signed = ("+" if delta > 0 else "") + f"{delta:.2f}".replace("-", "−")
    assert f"no difference detected ({signed} pp from one seed, so no interval)" in report
    assert f"| ResNet18 | SGD + SAM − SGD | 1 | {signed} (one seed) |" in report  # the At a glance table


@pytest.mark.xdist_group("finished_study")
def test_rerun_does_nothing_and_report_only_is_byte_identical(finished_study):
    folder, _, _ = finished_study
    with open(os.path.join(folder, "report.md"), "rb") as f:
        before = f.read()
    metrics = os.path.join(folder, "runs", "resnet18", "sgd", "seed0", "metrics.jsonl")
    stamp = os.stat(metrics).st_mtime_ns
    lines = []
    study_lib.run_study(study_config("smoke", **TINY), folder, command="python scripts/study.py (test)",
                        log=lines.append)  # fmt: skip
    assert lines[0].endswith("4/4 steps (trainings + measurements) already done") and len(lines) == 2
    assert os.stat(metrics).st_mtime_ns == stamp
    os.remove(os.path.join(folder, "report.md"))
    saved = os.path.join(folder, "study.json")
    with open(saved) as f:
        recorded = json.load(f)
    provenance = recorded.pop("runs")  # as a study copied together from several machines' runs would lack it
    assert sorted(provenance) == ["runs/resnet18/sgd/seed0", "runs/resnet18/sgd_sam/seed0"]
    with open(saved, "w") as f:
        json.dump(recorded, f)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--report_only",
                          "--workdir", folder], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(folder, "report.md"), "rb") as f:
        assert f.read() == before
    with open(saved) as f:
        assert json.load(f)["runs"] == provenance  # --report_only gathers the runs' provenance again


def test_a_terminated_study_stops_its_local_jobs_with_it(tmp_path):
    """SIGTERM to the command (kill, a scheduler's stop) stops the submitit job it is waiting for: submitit's
    jobs ignore SIGTERM, so without this the job trains on after the command and a new start waits for it."""
    folder = str(tmp_path / "terminated")
    command = [sys.executable, os.path.join(ROOT, "scripts", "study.py"),
               f"--config={os.path.join(ROOT, 'configs', 'study.py')}:smoke", "--workdir", folder, *_flags(TINY)]  # fmt: skip
    process = subprocess.Popen(command, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    first = os.path.join(folder, "runs", "resnet18", "sgd", "seed0", "config.json")
    deadline = time.time() + 600
    while not os.path.exists(first) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()[-2000:]
    process.send_signal(signal.SIGTERM)  # the command only, not its process group
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out[-2000:]
    assert "interrupted: stopped 1 running job(s); the same command resumes them" in out, out[-2000:]
    deadline = time.time() + 60  # submitit sends the job SIGINT, then SIGKILL one second later
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)  # anything left of the command's session?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("a job of the terminated study was still running a minute later")


@pytest.mark.xdist_group("finished_study")
def test_a_killed_study_resumes_without_retraining_and_reports_the_same(finished_study, tmp_path):
    reference_folder, _, _ = finished_study
    folder = str(tmp_path / "killed")
    command = [sys.executable, os.path.join(ROOT, "scripts", "study.py"),
               f"--config={os.path.join(ROOT, 'configs', 'study.py')}:smoke", "--workdir", folder, *_flags(TINY)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # The default executor runs the job in a child process (submitit's local executor): the kill
    # takes the whole process group, as a crash or a closed terminal would.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    second = os.path.join(folder, "runs", "resnet18", "sgd_sam", "seed0", "config.json")
    deadline = time.time() + 600
    while not os.path.exists(second) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()[-2000:]
    os.killpg(process.pid, signal.SIGKILL)  # the first arm is trained, the second has just started
    process.wait()
    first_metrics = os.path.join(folder, "runs", "resnet18", "sgd", "seed0", "metrics.jsonl")
    stamp = os.stat(first_metrics).st_mtime_ns
    assert not os.path.exists(os.path.join(folder, "report.md"))

    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].endswith("1/4 steps (trainings + measurements) already done"), lines
    assert not any("trained resnet18 sgd seed 0" in line for line in lines)
    assert os.stat(first_metrics).st_mtime_ns == stamp  # not trained again
    # The killed attempt at the SAM arm is counted in its provenance; the base trained in one attempt.
    provenance = [json.load(open(os.path.join(folder, "runs", "resnet18", arm, "seed0", "provenance.json")))
                  for arm in ("sgd", "sgd_sam")]  # fmt: skip
    assert "train_interrupted" not in provenance[0] and provenance[1]["train_interrupted"] == 1
    assert not [name for name in os.listdir(os.path.join(folder, "jobs")) if name.endswith(".attempt")]
    # The same report as the uninterrupted study, but for the command line it names.
    def body(path):
        return open(os.path.join(path, "report.md")).read().split("\n", 3)[3]

    assert body(folder) == body(reference_folder)
    reference = json.load(open(os.path.join(reference_folder, "summary.json")))["runs"]
    resumed = json.load(open(os.path.join(folder, "summary.json")))["runs"]
    for a, b in zip(reference, resumed):
        np.testing.assert_equal(a, b)


@pytest.mark.xdist_group("finished_study")
def test_split_pairs_make_each_run_a_job_and_the_last_to_train_measures_the_base(finished_study, tmp_path):
    """One job per run (`split_pairs`): the base's job cannot measure it (its interpolation needs the SAM
    partner's checkpoint), so the SAM arm's job, trained after it, measures both; the report is the pair jobs'."""
    reference_folder, _, _ = finished_study
    folder = str(tmp_path / "split")
    lines = []
    study_lib.run_study(study_config("smoke", **TINY), folder, command="python scripts/study.py (test)",
                        log=lines.append, split_pairs=True)  # fmt: skip
    assert [line.split("] ")[1].split(":")[0] for line in lines[1:5]] == [
        "trained resnet18 sgd seed 0", "trained resnet18 sgd_sam seed 0", "measured resnet18 sgd_sam seed 0",
        "measured resnet18 sgd seed 0"]
    assert open(os.path.join(folder, "report.md")).read() == open(os.path.join(reference_folder, "report.md")).read()
    reference = json.load(open(os.path.join(reference_folder, "summary.json")))["runs"]
    for a, b in zip(reference, json.load(open(os.path.join(folder, "summary.json")))["runs"]):
        np.testing.assert_equal(a, b)


@pytest.mark.xdist_group("finished_study")
def test_a_job_finding_a_measurement_locked_leaves_it_to_the_holder(finished_study, tmp_path):
    """Where another process holds a run's measurement lock (its pair's other job measuring it), `run_job` does
    not wait for it: it measures what it can and returns; the run is left to the holder."""
    import fcntl
    import shutil
    import threading

    from jaxsam import jobs

    source, _, _ = finished_study
    folder = str(tmp_path / "study")
    shutil.copytree(source, folder)
    base, sam = "runs/resnet18/sgd/seed0", "runs/resnet18/sgd_sam/seed0"
    for path in (base, sam):  # both trained, neither measured
        os.remove(os.path.join(folder, path, "geometry", "geometry.json"))
    result = []
    with open(os.path.join(folder, "jobs", base.replace(os.sep, "_") + ".measure.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # an open file of its own: flock locks it against this process too
        job = threading.Thread(target=lambda: result.append(jobs.run_job(folder, [sam])), daemon=True)
        job.start()
        job.join(timeout=300)  # the SAM run's own measurement, then the base found locked
        blocked = job.is_alive()
        fcntl.flock(held, fcntl.LOCK_UN)
    job.join()
    assert not blocked, "run_job waited for the lock held by another process"
    assert [what.split(":")[0] for what, _ in result[0]] == ["measured resnet18 sgd_sam seed 0"]
    assert not os.path.exists(os.path.join(folder, base, "geometry", "geometry.json"))
    # Free, the base is measured by the next job that reaches it, as in the pair job.
    steps = jobs.run_job(folder, [base])
    assert [what.split(":")[0] for what, _ in steps] == ["measured resnet18 sgd seed 0"]
    measured, reference = (json.load(open(os.path.join(root, base, "geometry", "geometry.json")))["splits"]["train"]
                           for root in (folder, source))  # fmt: skip
    assert measured["worst_case"]["value"] == reference["worst_case"]["value"]


def test_a_training_attempt_that_died_counts_up_to_its_last_metrics_line(tmp_path):
    """`train_seconds` adds a killed attempt's seconds from its start to its last metrics.jsonl line, once; an
    attempt that died before writing its run folder (a bad config) adds nothing and creates nothing."""
    from jaxsam import files, provenance

    study_dir, path = str(tmp_path), os.path.join("runs", "resnet18", "sgd", "seed0")
    os.makedirs(os.path.join(study_dir, "jobs"))
    os.makedirs(os.path.join(study_dir, path))
    files.write_json(os.path.join(study_dir, path, "provenance.json"), {"train_seconds": 10.0})
    metrics = os.path.join(study_dir, path, "metrics.jsonl")
    open(metrics, "w").write('{"step": 20}\n')
    start = 1.7e9
    provenance.begin_attempt(study_dir, path, start)
    os.utime(metrics, (start + 60.0, start + 60.0))  # its last line, a minute after it started
    assert provenance.count_interrupted_attempt(study_dir, path) == 60.0
    saved = provenance.read_provenance(os.path.join(study_dir, path))
    assert saved == {"train_seconds": 70.0, "train_interrupted": 1}
    assert provenance.count_interrupted_attempt(study_dir, path) == 0.0  # counted once
    other = os.path.join("runs", "vgg16", "sgd", "seed0")
    provenance.begin_attempt(study_dir, other, start)
    assert provenance.count_interrupted_attempt(study_dir, other) == 0.0
    assert not os.path.exists(os.path.join(study_dir, other)) and os.listdir(os.path.join(study_dir, "jobs")) == []


@pytest.mark.xdist_group("finished_study")
def test_export_gets_each_finished_run_as_its_job_ends_and_refuses_to_lose_what_it_holds(finished_study, tmp_path):
    """`export`: after each job the finished runs' small files are in the export folder (a study stopped midway
    has them there), at the end the report too; an export folder of other settings, or holding finished runs
    the study folder lacks, is refused before anything is written."""
    import shutil

    from jaxsam import jobs

    source, _, _ = finished_study
    folder, dest = str(tmp_path / "study"), str(tmp_path / "export")
    shutil.copytree(source, folder)
    for arm in ("sgd", "sgd_sam"):  # trained, to be measured again: one job each (split pairs)
        os.remove(os.path.join(folder, "runs", "resnet18", arm, "seed0", "geometry", "geometry.json"))
    runs = {arm: os.path.join(dest, "runs", "resnet18", arm, "seed0", "geometry", "geometry.json")
            for arm in ("sgd", "sgd_sam")}  # fmt: skip
    seen = []

    def log(line):
        if line.startswith("exported "):
            seen.append({arm: os.path.exists(path) for arm, path in runs.items()})

    study_lib.run_study(study_config("smoke", **TINY), folder, command="python scripts/study.py (test)", log=log,
                        split_pairs=True, export=dest)  # fmt: skip
    assert seen == [{"sgd": True, "sgd_sam": False}, {"sgd": True, "sgd_sam": True}]
    def body(path):
        return open(os.path.join(path, "report.md")).read().split("\n", 3)[3]

    assert body(dest) == body(source)
    assert not os.path.exists(os.path.join(dest, "runs", "resnet18", "sgd", "seed0", "checkpoints"))
    # A new study folder exporting to it would replace its report by one without its two runs.
    fresh = str(tmp_path / "fresh")
    with pytest.raises(ValueError, match=r"^--export folder .*export holds 2 finished run\(s\) that .*fresh lacks "
                                         r"\(resnet18 sgd seed 0, \.\.\.\): copy them in first \(cp -r "):
        study_lib.run_study(study_config("smoke", **TINY), fresh, log=log, export=dest)
    with pytest.raises(ValueError, match=r"^--export folder .* holds a study with other measure settings"):
        study_lib.run_study(study_config("smoke", **{**TINY, "measure.n_examples": 16}), fresh, log=log,
                            export=dest)  # fmt: skip
    assert not os.path.exists(fresh)
    # The same study, holding every run the export has: exporting to it again passes the check.
    same = study_config("smoke", **TINY)
    assert jobs.check_export(same, folder, dest, study_lib.plan(same)) is None


@pytest.mark.xdist_group("finished_study")
def test_runs_copied_without_checkpoints_merge_into_a_study_and_record_their_code_version(finished_study, tmp_path):
    """A study folder made of another machine's small files (no checkpoints) is done and reports the same;
    study.json names the commit each run was made with; a copied run whose measures are not the study's
    cannot be finished without its checkpoint, and says so before anything is written."""
    from jaxsam import jobs, provenance

    source, _, _ = finished_study
    saved = json.load(open(os.path.join(source, "study.json")))
    assert set(saved["runs"]) == {os.path.join("runs", "resnet18", a, "seed0") for a in ("sgd", "sgd_sam")}
    for record in saved["runs"].values():
        assert record["train"]["commit"] == provenance.code_version()["commit"] and record["train_seconds"] > 0
        assert record["measure"]["devices"].startswith("1 x ") and record["measure_seconds"] > 0
    folder = str(tmp_path / "merged")
    copied = jobs.export_small_files(source, folder)  # what scripts/study.py --export=DIR writes
    for arm in ("sgd", "sgd_sam"):
        path = os.path.join("runs", "resnet18", arm, "seed0")
        assert {os.path.join(path, name) for name in jobs.SMALL_FILES} <= set(copied)
        assert not os.path.exists(os.path.join(folder, path, "checkpoints"))
    assert "study.json" in copied and "report.md" in copied
    lines = []
    study_lib.run_study(study_config("smoke", **TINY), folder, command="python scripts/study.py (test)",
                        log=lines.append)  # fmt: skip
    assert lines[0].endswith("4/4 steps (trainings + measurements) already done") and len(lines) == 2
    def body(path):
        return open(os.path.join(path, "report.md")).read().split("\n", 3)[3]

    assert body(folder) == body(source)
    before = {name: open(os.path.join(folder, name)).read() for name in ("study.json", "report.md")}
    with pytest.raises(ValueError, match=r"has finished training but no final checkpoint, and its geometry is not "
                                         r"measured with this study's options \(ascent_steps: 2 -> 3\): copy its "
                                         r"checkpoints/ too, measure with the options it was made with"):
        study_lib.run_study(study_config("smoke", **{**TINY, "measure.ascent_steps": 3}), folder, log=lines.append)
    assert {name: open(os.path.join(folder, name)).read() for name in before} == before
    # pair_epochs may change between starts, but a pair's runs made with other epochs are refused, not extended.
    longer = {**TINY, "pair_epochs": "resnet18:sgd=3"}
    with pytest.raises(ValueError, match=r"^resnet18 sgd seed 0 in .* was made with other settings"):
        study_lib.run_study(study_config("smoke", **longer), folder, log=lines.append)
    assert {name: open(os.path.join(folder, name)).read() for name in before} == before


def test_bad_study_input_is_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "study"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"),
                          f"--config={os.path.join(ROOT, 'configs', 'study.py')}:smoke", "--workdir", str(folder),
                          "--config.arms=sgd,lion"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: study.arms has unknown ['lion']: choose from " + ", ".join(study_lib.ARMS)
        + " (or a SAM arm at another ρ, e.g. adam_sam_rho0.1)"
    ]
    assert not folder.exists()


def test_a_study_folder_refuses_other_settings_but_lets_the_grid_grow(tmp_path):
    folder = str(tmp_path)
    study_lib._check_or_write_study(study_config("smoke"), folder, "first")
    saved = open(os.path.join(folder, "study.json")).read()
    with pytest.raises(ValueError, match=r"holds a study with other measure settings: use a new --workdir"):
        study_lib._check_or_write_study(study_config("smoke", **{"measure.rho": 0.1}), folder, "second")
    assert open(os.path.join(folder, "study.json")).read() == saved  # nothing overwritten
    study_lib._check_or_write_study(study_config("smoke", seeds=3, arms="sgd,sgd_sam,adam"), folder, "third")
    grown, command = study_lib.read_study(folder)
    assert (grown.seeds, grown.arms, command) == (3, "sgd,sgd_sam,adam", "third")
    # A study folder from before a field existed resumes (the field counts as its default), unless it is changed.
    with open(os.path.join(folder, "study.json")) as f:
        older = json.load(f)
    del older["study"]["run"]["train"]["nan_policy"]
    with open(os.path.join(folder, "study.json"), "w") as f:
        json.dump(older, f)
    study_lib._check_or_write_study(study_config("smoke", seeds=3, arms="sgd,sgd_sam,adam"), folder, "fourth")
    with open(os.path.join(folder, "study.json"), "w") as f:
        json.dump(older, f)
    with pytest.raises(ValueError, match=r"holds a study with other run settings"):
        study_lib._check_or_write_study(
            study_config("smoke", seeds=3, arms="sgd,sgd_sam,adam", **{"run.train.nan_policy": "skip"}), folder, "fifth"
        )
