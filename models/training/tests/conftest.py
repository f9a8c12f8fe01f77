import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Under CI every skip is a failure: the same hooks as the integration suite
# (integration-tests/ci_no_skip.py says why), loaded from that one file.
_spec = importlib.util.spec_from_file_location(
    "ci_no_skip", Path(__file__).resolve().parents[3] / "integration-tests" / "ci_no_skip.py")
_ci_no_skip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ci_no_skip)
pytest_runtest_makereport = _ci_no_skip.pytest_runtest_makereport
pytest_make_collect_report = _ci_no_skip.pytest_make_collect_report
