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


def _tracked_text_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if (ROOT / f).is_file() and f.endswith((".py", ".md", ".toml", ".conf"))]


def test_no_citations_of_files_outside_the_repository() -> None:
    """Facts the code relies on live in docs/ (docs/formats.md) or in a public specification it names."""
    import re

    outside = re.compile(r"\b(REFERENCE|STYLE|DESIGN)(\.md\b| §)")
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
                 for p in _tracked_text_files() if p != Path(__file__).resolve()
                 for n, line in enumerate(p.read_text(errors="ignore").splitlines(), 1) if outside.search(line)]  # fmt: skip
    assert offenders == [], "\n".join(offenders)


def test_formats_md_sections_cited_exist() -> None:
    import re

    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs/formats.md").read_text(), re.MULTILINE))
    cite = re.compile(r"docs/formats\.md ((?:§\d+(?:\s*[-,]\s*)?)+)")
    cited: dict[str, list[str]] = {}
    for p in _tracked_text_files():
        for n, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
            for m in cite.finditer(line):
                for number in re.findall(r"\d+", m.group(1)):
                    cited.setdefault(number, []).append(f"{p.relative_to(ROOT)}:{n}")
    assert cited, "no module cites docs/formats.md"
    missing = {k: v for k, v in cited.items() if k not in sections}
    assert missing == {}, f"cited sections not in docs/formats.md: {missing}"
