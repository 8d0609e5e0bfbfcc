import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools/gen_config_reference.py"), "--check"], check=False)
    assert result.returncode == 0, "docs/configuration.md is stale: run tools/gen_config_reference.py"


def test_no_mirror_host_names_in_repo() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = __import__("re").compile(r"(deb|security|archive|snapshot)\.(debian|ubuntu)\.(org|com)")
    offenders = [f for f in files if (ROOT / f).is_file() and pattern.search((ROOT / f).read_text(errors="ignore"))]
    assert offenders == []
