"""The README's tour is a test: its shell blocks run in order, as written, and print what it shows.

The blocks of README.md's "A tour" section are joined into one bash script (``set -euo
pipefail``) and run in a scratch directory that looks like the checkout (its ``.venv`` linked in)
with a scratch store (``REPROBUILD_STORE``) and cache, so nothing outside the scratch directory
is touched. Every ``#> LINE`` comment below a command is expected output: each must match a
line the tour printed (stdout or stderr), in order, where ``…`` stands for any text.

The ``reprobuild vm`` line boots an image, so it runs in its own test (marked ``boot`` too),
in the directory where the tour reached it, after the rest of the tour.

Marked ``live``: the tour locks against the host's mirror and builds a bootable image twice,
plus verify's rebuild. Needs root.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest_boot import cli_early_crash, retry_early_crash_once

REPO = Path(__file__).resolve().parent.parent
SECTION = "## A tour"
TIMEOUT = 3600


EXIT = re.compile(r"^\(exit status (\d+)")  # a "#> (exit status N…" line: the status the command must give


@dataclass(frozen=True)
class Step:
    command: str  # one shell command (with its continuation lines and heredoc)
    expected: tuple[str, ...]  # the #> lines that follow it (output lines, or one "(exit status N…)")

    @property
    def status(self) -> int:
        return next((int(m.group(1)) for e in self.expected if (m := EXIT.match(e))), 0)

    @property
    def output(self) -> tuple[str, ...]:
        return tuple(e for e in self.expected if not EXIT.match(e))

    def script(self) -> str:
        """The command for ``bash -e``: a command expected to exit non-zero must exit with exactly that."""
        if not self.status:
            return self.command
        return (f"rc=0\n{self.command} || rc=$?\n"
                f"if [ $rc != {self.status} ]; then echo \"exit status $rc, the README says {self.status}\"; exit 1; fi")


def tour_steps(readme: str) -> list[Step]:
    """The tour's commands with their expected output, in order (pure)."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start:end if end != -1 else len(readme)]
    steps: list[Step] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.startswith("#"):
                i += 1
                continue
            command = [line]
            heredoc = re.search(r"<<'?(\w+)'?", line)
            while command[-1].endswith("\\") or heredoc:
                i += 1
                command.append(lines[i])
                if heredoc and lines[i] == heredoc.group(1):
                    heredoc = None
            i += 1
            expected = []
            while i < len(lines) and lines[i].startswith("#> "):
                expected.append(lines[i][3:])
                i += 1
            steps.append(Step("\n".join(command), tuple(expected)))
    return steps


def is_boot(step: Step) -> bool:
    return step.command.startswith("reprobuild vm ")


def pattern(expected: str) -> re.Pattern[str]:
    return re.compile("^" + ".*?".join(re.escape(part) for part in expected.split("…")) + "$")


def unmatched(expected: list[str], output: str) -> list[str]:
    """The expected lines that do not match the output's lines in order (pure)."""
    lines = [ln.rstrip() for ln in output.splitlines()]
    pos, missing = 0, []
    for want in expected:
        rx = pattern(want.rstrip())
        for j in range(pos, len(lines)):
            if rx.match(lines[j]):
                pos = j + 1
                break
        else:
            missing.append(want)
    return missing


def test_tour_parser_keeps_commands_heredocs_and_expectations() -> None:
    readme = ("# x\n## A tour\n```sh\ncd demo  # c\ncat > f <<'EOF'\n[A]\nB=1\nEOF\n#> out …\n"
              "reprobuild verify a \\\n    --b c\n#> v\n```\n## Next\n```sh\nnot this\n```\n")
    steps = tour_steps(readme)
    assert [s.command for s in steps] == ["cd demo  # c", "cat > f <<'EOF'\n[A]\nB=1\nEOF",
                                          "reprobuild verify a \\\n    --b c"]
    assert [s.expected for s in steps] == [(), ("out …",), ("v",)]
    assert unmatched(["out …", "v"], "x\nout 12 s\nv\n") == []
    assert unmatched(["v", "out …"], "out 1\nv\n") == ["out …"]
    diff = tour_steps("## A tour\n```sh\nreprobuild diff a b\n#> (exit status 1: differ)\n#> x\n```\n")[0]
    assert diff.status == 1 and diff.output == ("x",)
    assert subprocess.run(["bash", "-ec", diff.script().replace("reprobuild diff a b", "false")],
                          capture_output=True, check=False).returncode == 0
    assert subprocess.run(["bash", "-ec", diff.script().replace("reprobuild diff a b", "true")],
                          capture_output=True, check=False).returncode == 1


def test_readme_tour_has_its_parts() -> None:
    steps = tour_steps((REPO / "README.md").read_text())
    commands = [s.command for s in steps]
    assert sum(is_boot(s) for s in steps) == 1 and all("--expect" in c for c in commands if c.startswith("reprobuild vm"))
    assert any(c.startswith("reprobuild diff ") for c in commands)
    assert all(s.expected for s in steps if s.command.startswith(("reprobuild verify", "reprobuild diff")))
    readme = (REPO / "README.md").read_text()
    assert "make image" in readme and "make test" in readme


@dataclass(frozen=True)
class TourRun:
    root: Path
    output: str
    vm_cwd: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TourRun]:
    root = tmp_path_factory.mktemp("readme-tour")
    (root / ".venv").symlink_to(REPO / ".venv")
    state = root / ".tour-state"
    state.mkdir()
    script = ["set -euo pipefail"]
    for step in tour_steps((REPO / "README.md").read_text()):
        # The boot step runs in its own test: here, only where it would run is recorded.
        script.append(f"pwd > {shlex.quote(str(state / 'vm_cwd'))}" if is_boot(step) else step.script())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPROBUILD_", "VIRTUAL_ENV"))}
    env.update(REPROBUILD_STORE=str(root / "store"), XDG_CACHE_HOME=str(root / "cache"), CI="true")
    env.pop("SOURCE_DATE_EPOCH", None)
    r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=root, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=TIMEOUT, check=False)
    (root / "tour.log").write_text(r.stdout)
    try:
        assert r.returncode == 0, r.stdout[-6000:]
        yield TourRun(root, r.stdout, Path((state / "vm_cwd").read_text().strip()), env)
    finally:  # the store and images are gigabytes: keep only the definition, keys and tour.log
        shutil.rmtree(root / "store", ignore_errors=True)
        for out in root.glob("demo/out*"):
            shutil.rmtree(out, ignore_errors=True)


@pytest.mark.live
def test_readme_tour_runs_as_written(tour: TourRun) -> None:
    steps = [s for s in tour_steps((REPO / "README.md").read_text()) if not is_boot(s)]
    missing = unmatched([e for s in steps for e in s.output], tour.output)
    assert missing == [], f"README lines not printed by the tour: {missing}\n--- output ---\n{tour.output[-8000:]}"
    assert not (REPO / "demo").exists() or (REPO / "demo").is_dir()  # the tour ran in its scratch copy


@pytest.mark.live
@pytest.mark.boot
def test_readme_tour_boots(tour: TourRun) -> None:
    [step] = [s for s in tour_steps((REPO / "README.md").read_text()) if is_boot(s)]

    def boot() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", f"set -euo pipefail\n. {shlex.quote(str(tour.root / '.venv/bin/activate'))}\n"
                               + step.command], cwd=tour.vm_cwd, env=tour.env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=TIMEOUT, check=False)  # fmt: skip

    # One retry, with a warning, only when the guest kernel crashed before userspace (tests/guest_boot.py).
    r, note = retry_early_crash_once(boot, lambda r: cli_early_crash(r.stdout))
    assert r.returncode == 0, f"{note}\n{r.stdout[-6000:]}"
    assert unmatched(list(step.output), r.stdout) == [], f"{note}\n{r.stdout[-6000:]}"
