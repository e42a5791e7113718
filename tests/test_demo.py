"""The demo, at a tiny size: phantoms -> training -> samples -> previews, with no data."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from medsynth.phantoms import head_phantom


def test_demo_runs_end_to_end(run_cli, tmp_path):
    code, out, err = run_cli(
        "demo", "-o", tmp_path, "--steps", "3", "--size", "16", "--phantoms", "4", "--samples", "2"
    )
    assert code == 0, err
    assert "Demo finished" in out
    assert len(list((tmp_path / "phantoms").glob("*.nii.gz"))) == 4
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    for name in ("real.png", "latest.png"):
        assert (tmp_path / "run" / "previews" / name).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "samples" / "preview.png").exists()
    manifest = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert manifest["count"] == 2
    image = nib.load(str(tmp_path / "samples" / "sample_00000.nii.gz"))
    assert image.shape == (16, 16, 16) and image.get_data_dtype() == np.int16


def test_demo_plan_and_sampling_failures_are_one_line(run_cli, tmp_path):
    # No phantom is a volume at io.min_slices=1000: the plan cannot be made.
    code, out, err = run_cli("demo", "-o", tmp_path / "a", "--steps", "1", "--size", "16", "--phantoms", "2",
                             "--set", "io.min_slices=1000")  # fmt: skip
    assert code == 1 and "no usable images found" in err and "Traceback" not in err
    # The samples folder is taken by a file: sampling cannot write there.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "samples").write_text("not a folder")
    code, out, err = run_cli("demo", "-o", tmp_path / "b", "--steps", "1", "--size", "16", "--phantoms", "2")
    assert code == 2 and "is a file" in err and "Traceback" not in err
    assert (tmp_path / "b" / "samples").read_text() == "not a folder"


def test_phantoms_are_heads_in_hounsfield_units_and_vary():
    a, affine = head_phantom(0, shape=(48, 48, 48), spacing=4.0)
    b, _ = head_phantom(1, shape=(48, 48, 48), spacing=4.0)
    assert a.dtype == np.int16 and affine[0, 0] == 4.0
    assert (a < -900).mean() > 0.3  # air around the head
    assert (a > 500).sum() > 0  # skull
    brain = (a > 15) & (a < 60)
    assert brain.mean() > 0.05
    assert not np.array_equal(a, b)
    assert abs(int((a > -500).sum()) - int((b > -500).sum())) > 0  # different head sizes
