"""The command line as a user meets it: fast help, readable reports, JSON for machines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import blob_volume, write_nifti

from medsynth.plan import Plan


def test_help_is_fast_and_does_not_import_torch():
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['medsynth', '--help']\n"
        "try:\n    runpy.run_module('medsynth', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'nibabel', 'SimpleITK', 'pydicom', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "inspect" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "medsynth", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("medsynth ")


def test_inspect_report_and_saved_plan(run_cli, tmp_path):
    for seed in range(3):
        write_nifti(tmp_path / "scans" / f"s{seed}.nii.gz", blob_volume(seed=seed))
    (tmp_path / "scans" / "readme.txt").write_text("x")
    code, out, err = run_cli(
        "inspect", tmp_path / "scans", "--save-plan", tmp_path / "plan.json", "--set", "plan.target_shape=[32,32,16]"
    )
    assert code == 0
    assert "3 volumes in" in out and "Plan" in out and "32×32×16" in out
    assert "not a recognised image format" in out  # the ignored .txt is accounted for
    assert Plan.load(tmp_path / "plan.json").target_shape == (32, 32, 16)


def test_inspect_json_is_clean_on_stdout(run_cli, tmp_path):
    write_nifti(tmp_path / "a.nii.gz", blob_volume())
    code, out, _ = run_cli("inspect", tmp_path, "--json")
    report = json.loads(out)
    assert code == 0 and report["sources"][0]["shape"] == [20, 24, 16]
    assert set(report) == {"root", "sources", "skipped", "ignored", "fingerprint", "plan"}


@pytest.mark.realdata
def test_inspect_real_ixi_reports_139_volumes_and_a_sensible_plan(run_cli, shared_data):
    code, out, err = run_cli("inspect", shared_data / "train" / "ixi-t1", "--json")
    report = json.loads(out)
    assert code == 0 and len(report["sources"]) == 139 and report["skipped"] == []
    assert all(s["orientation"] == "PSR" and s["shape"] == [120, 120, 90] for s in report["sources"])
    plan = report["plan"]
    assert plan["modality"] == "mr" and plan["target_shape"] == [64, 64, 64]
    assert 3.0 <= plan["spacing"][0] <= 4.0


@pytest.mark.realdata
# "." walks every folder of the shared data at once (a minute on 2 cores): slow; the others run by default.
@pytest.mark.parametrize("folder", ["dicom", "nifti", "train/hippocampus", pytest.param(".", marks=pytest.mark.slow)])
def test_inspect_every_real_folder_without_a_traceback(run_cli, shared_data, folder):
    code, out, err = run_cli("inspect", shared_data / folder)
    assert code == 0, err
    assert "Traceback" not in out + err and "Plan" in out


@pytest.mark.parametrize(
    ("values", "digits", "text"),
    [
        ((240, 240, 4), 0, "240×240×4"),  # whole numbers keep their zeros
        ((100.0, 20.0, 0.0), 0, "100×20×0"),
        ((0.9375, 0.9375, 1.2), 2, "0.94×0.94×1.2"),
        ((2.0, 2.5, 10.0), 2, "2×2.5×10"),
        ((1.0, 1.0, 1.0), 3, "1×1×1"),
    ],
)
def test_sizes_and_spacings_print_as_people_write_them(values, digits, text):
    from medsynth.plan import format_triple

    assert format_triple(values, digits) == text


def test_openmp_waits_passively_unless_the_user_chose():
    """Spinning OpenMP threads made two medsynth processes on 2 cores 2.6x slower each."""
    probe = "import os, medsynth; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    chosen = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        timeout=60,
    )
    assert default.stdout.strip() == "PASSIVE" and chosen.stdout.strip() == "ACTIVE"


def test_threads_option_sets_torch_threads(run_cli, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run_cli("sample", tmp_path / "none", "-n", "1", "-o", tmp_path / "out", "--threads", "1")
        assert code == 1 and "no such checkpoint" in err  # the option parsed; the missing run is the failure
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_cli_choices_are_the_library_s():
    from medsynth.cli import OutputFormat
    from medsynth.sample import FORMATS

    assert tuple(f.value for f in OutputFormat) == FORMATS  # --help lists what sample can write
