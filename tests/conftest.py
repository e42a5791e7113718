import os
import sys
from pathlib import Path

# Before anything imports torch (test modules do, before medsynth): OpenMP threads that spin while
# waiting made torch calls up to 40x slower when other work shared the 2 cores (docs/benchmarks.md,
# "Threads"); medsynth sets the same when it is imported, which in tests comes too late.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI must be reproducible: the same examples every run, so a red build is the code's doing and
# can be replayed. Locally, hypothesis keeps exploring new examples (and saves any it breaks).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

sys.path.insert(0, str(Path(__file__).parent))

# ../shared/data beside the checkout; MEDSYNTH_TEST_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("MEDSYNTH_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six 32³ CT head phantoms at 6 mm, shared read-only by every test that trains."""
    from medsynth.phantoms import write_phantoms

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 6, shape=(32, 32, 32), spacing=6.0)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache folder: no test sees another's cached volumes, or the user's."""
    monkeypatch.setenv("MEDSYNTH_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `medsynth ARGS...` in-process; return (exit code, stdout, stderr)."""
    from medsynth.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["medsynth", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
