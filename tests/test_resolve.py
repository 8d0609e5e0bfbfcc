"""The resolver on small synthetic universes: each test builds the packages it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reprobuild.debian.control import Relation, iter_stanzas
from reprobuild.debian.package import BinaryPackage
from reprobuild.errors import RepositoryError, ResolutionFailed
from reprobuild.resolve import (
    AbsentCandidate,
    DebProvider,
    InconsistentResolution,
    IndexText,
    PackageKey,
    ProgressReporter,
    RepoCandidate,
    ResolveRequest,
    Universe,
    check_consistency,
    resolve,
)

DATA = Path(__file__).parent / "data"


def pkg(name: str, version: str = "1.0", **fields: Any) -> BinaryPackage:
    fields.setdefault("architecture", "amd64")
    return BinaryPackage(
        name=name,
        version=version,
        source=name,
        source_version=version,
        filename=f"pool/main/{name[0]}/{name}/{name}_{version}_{fields['architecture']}.deb",
        size=1000,
        sha256=f"{abs(hash((name, version))):064x}"[:64],
        **fields,
    )


def universe(*packages: BinaryPackage) -> Universe:
    return Universe.from_packages(packages, "amd64")


def run(u: Universe, *names: str, **options: Any) -> dict[str, str]:
    """Resolve with no base set unless asked; return {name: version}."""
    options.setdefault("base_set", "none")
    result = resolve(u, ResolveRequest(tuple(names), **options))
    return {p.package.name: p.package.version for p in result.packages}


# --------------------------------------------------------------------------- basics


def test_dependency_chain_edges_and_reasons() -> None:
    u = universe(
        pkg("app", depends="libfoo (>= 1), libbar", pre_depends="libc6"),
        pkg("libfoo", "1.2", depends="libc6"),
        pkg("libbar", depends="libc6 (>= 2)"),
        pkg("libc6", "2.36"),
        pkg("unrelated"),
    )
    result = resolve(u, ResolveRequest(("app",), base_set="none"))
    by_name = {p.package.name: p for p in result.packages}
    assert list(by_name) == ["app", "libbar", "libc6", "libfoo"]
    assert by_name["app"].dependencies == ("libbar", "libc6", "libfoo")
    assert by_name["app"].pre_dependencies == ("libc6",)
    assert by_name["app"].reason == "requested"
    assert by_name["libfoo"].reason == "dependency of app"
    assert by_name["libc6"].reason == "dependency of app"  # shortest path, not via libfoo


def test_base_sets() -> None:
    u = universe(
        pkg("dpkg", essential=True, priority="required", depends="tar"),
        pkg("tar", essential=True, priority="required"),
        pkg("mawk", priority="required"),
        pkg("apt", priority="important", depends="gpgv"),
        pkg("gpgv", priority="important"),
        pkg("vim", priority="standard"),
    )
    assert set(run(u, base_set="none")) == set()
    assert set(run(u, base_set="essential")) == {"dpkg", "tar"}
    assert set(run(u, base_set="minbase")) == {"dpkg", "tar", "mawk", "apt", "gpgv"}
    result = resolve(u, ResolveRequest(("tar",), base_set="minbase"))
    reasons = {p.package.name: p.reason for p in result.packages}
    assert reasons == {
        "tar": "requested",
        "dpkg": "essential",
        "mawk": "priority required",
        "apt": "priority required",
        "gpgv": "dependency of apt",
    }
    with pytest.raises(ResolutionFailed, match="unknown base set"):
        run(u, base_set="fat")


def test_other_architectures_ignored_and_all_is_native() -> None:
    u = universe(
        pkg("tool", depends="data, helper"),
        pkg("data", architecture="all"),
        pkg("helper", architecture="arm64"),
    )
    with pytest.raises(ResolutionFailed, match="helper"):
        run(u, "tool")
    assert run(universe(pkg("tool", depends="data"), pkg("data", architecture="all")), "tool") == {
        "tool": "1.0",
        "data": "1.0",
    }


# --------------------------------------------------------------------------- alternatives and virtuals


def test_first_satisfiable_alternative_in_written_order() -> None:
    u = universe(pkg("x", depends="b | a"), pkg("a"), pkg("b"))
    assert set(run(u, "x")) == {"x", "b"}
    u = universe(pkg("x", depends="missing | b (>= 2) | a"), pkg("a"), pkg("b"))
    assert set(run(u, "x")) == {"x", "a"}


def test_alternative_already_wanted_wins() -> None:
    """apt: if a member of the OR group is already marked for install, nothing else is added."""
    u = universe(
        pkg("init", depends="systemd-sysv | sysvinit-core"), pkg("systemd-sysv"), pkg("sysvinit-core")
    )
    assert set(run(u, "init")) == {"init", "systemd-sysv"}
    assert set(run(u, "init", "sysvinit-core")) == {"init", "sysvinit-core"}
    assert set(run(u, "sysvinit-core", "init")) == {"init", "sysvinit-core"}


def test_alternative_avoids_conflict() -> None:
    u = universe(
        pkg("x", depends="a | b"),
        pkg("a", conflicts="y"),
        pkg("b"),
        pkg("y"),
    )
    assert set(run(u, "x", "y")) == {"x", "y", "b"}


def test_virtual_provider_order_essential_then_priority_then_name() -> None:
    u = universe(
        pkg("user", depends="awk"),
        pkg("gawk", provides="awk", priority="optional"),
        pkg("mawk", provides="awk", priority="required"),
        pkg("original-awk", provides="awk", priority="optional"),
    )
    assert set(run(u, "user")) == {"user", "mawk"}
    u = universe(
        pkg("user", depends="awk"),
        pkg("zawk", provides="awk", priority="optional"),
        pkg("gawk", provides="awk", priority="optional"),
    )
    assert set(run(u, "user")) == {"user", "gawk"}
    u = universe(
        pkg("user", depends="awk"),
        pkg("mawk", provides="awk", priority="required"),
        pkg("zawk", provides="awk", priority="optional", essential=True),
    )
    assert set(run(u, "user")) == {"user", "zawk"}


def test_real_package_beats_providers() -> None:
    u = universe(pkg("user", depends="foo"), pkg("foo"), pkg("afoo", provides="foo", priority="required"))
    assert set(run(u, "user")) == {"user", "foo"}


def test_versioned_provides() -> None:
    u = universe(
        pkg("user", depends="libabi (>= 2)"),
        pkg("impl-old", provides="libabi (= 1)"),
        pkg("impl-new", provides="libabi (= 2.5)"),
        pkg("impl-unversioned", provides="libabi"),
    )
    assert set(run(u, "user")) == {"user", "impl-new"}


def test_unversioned_provides_do_not_satisfy_versioned_dependency() -> None:
    u = universe(pkg("user", depends="libabi (>= 2)"), pkg("impl", provides="libabi"))
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "user")
    assert "libabi (>= 2)" in failure.value.message
    assert set(run(universe(pkg("user", depends="libabi"), pkg("impl", provides="libabi")), "user")) == {
        "user",
        "impl",
    }


def test_requesting_a_virtual_package() -> None:
    """As apt: one provider is taken; several must be chosen by the user."""
    u = universe(pkg("exim", provides="mail-transport-agent"))
    result = resolve(u, ResolveRequest(("mail-transport-agent",), base_set="none"))
    assert [(p.package.name, p.reason) for p in result.packages] == [("exim", "requested")]
    u = universe(
        pkg("exim", provides="mail-transport-agent"), pkg("postfix", provides="mail-transport-agent")
    )
    with pytest.raises(ResolutionFailed, match="virtual package provided by exim, postfix"):
        resolve(u, ResolveRequest(("mail-transport-agent",), base_set="none"))


# --------------------------------------------------------------------------- conflicts and breaks


def test_conflicts_between_requested_packages_is_explained() -> None:
    u = universe(pkg("exim", conflicts="postfix"), pkg("postfix", "3.7"), pkg("other"))
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "exim", "postfix")
    message = failure.value.message
    assert "exim 1.0 conflicts with postfix" in message
    assert "the user requested postfix" in message
    assert "postfix: available versions 3.7" in message
    assert "To fix this" in message
    assert failure.value.exit_code == 3


def test_conflicts_through_provides_and_self_conflict() -> None:
    u = universe(
        pkg("exim", provides="mail-transport-agent", conflicts="mail-transport-agent"),
        pkg("postfix", provides="mail-transport-agent", conflicts="mail-transport-agent"),
        pkg("mailx", depends="exim | postfix"),
    )
    assert set(run(u, "exim")) == {"exim"}  # provides and conflicts its own virtual: fine
    assert set(run(u, "postfix", "mailx")) == {"postfix", "mailx"}
    with pytest.raises(ResolutionFailed, match="conflicts with"):
        run(u, "exim", "postfix")


def test_breaks_forces_newer_or_older_version() -> None:
    u = universe(
        pkg("libnew", "2.0", breaks="plugin (<< 2)"),
        pkg("plugin", "1.0"),
        pkg("plugin", "2.0"),
        pkg("plugin", "3.0", breaks="libnew (>= 2)"),
    )
    assert run(u, "libnew", "plugin") == {"libnew": "2.0", "plugin": "2.0"}
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "libnew", "plugin=1.0")
    assert "libnew 2.0 breaks plugin (<< 2)" in failure.value.message


def test_conflicts_never_pull_in_their_target() -> None:
    """A package named only by Conflicts/Breaks stays absent even if some version would be allowed."""
    u = universe(pkg("x", breaks="y (<< 2)", conflicts="z"), pkg("y", "1.0"), pkg("y", "2.0"), pkg("z"))
    assert run(u, "x") == {"x": "1.0"}


def test_breaks_through_versioned_provides() -> None:
    u = universe(
        pkg("core", breaks="abi (<< 3)"),
        pkg("ext-old", provides="abi (= 2)"),
        pkg("ext-new", provides="abi (= 3)"),
        pkg("user", depends="ext-old | ext-new"),
    )
    assert set(run(u, "core", "user")) == {"core", "user", "ext-new"}


# --------------------------------------------------------------------------- multi-arch and pre-depends


def test_any_qualifier_needs_multi_arch_allowed_or_foreign() -> None:
    u = universe(
        pkg("script", depends="perl:any, python3:any"),
        pkg("perl", multi_arch="allowed"),
        pkg("python3", multi_arch="foreign"),
    )
    assert set(run(u, "script")) == {"script", "perl", "python3"}
    u = universe(pkg("script", depends="perl:any"), pkg("perl"))  # Multi-Arch: no
    with pytest.raises(ResolutionFailed, match="perl:any"):
        run(u, "script")
    u = universe(pkg("script", depends="perl:native"), pkg("perl"))
    assert set(run(u, "script")) == {"script", "perl"}


def test_arch_qualified_request() -> None:
    u = universe(pkg("tool"))
    assert run(u, "tool:amd64") == {"tool": "1.0"}
    with pytest.raises(ResolutionFailed, match="native architecture"):
        run(u, "tool:i386")


def test_pre_depends_are_reported_separately() -> None:
    u = universe(pkg("x", pre_depends="a | b", depends="c"), pkg("b"), pkg("c"))
    result = resolve(u, ResolveRequest(("x",), base_set="none"))
    x = result.packages[-1]
    assert x.package.name == "x"
    assert x.dependencies == ("b", "c") and x.pre_dependencies == ("b",)


# --------------------------------------------------------------------------- suites, versions, pins


def test_several_suites_highest_wins_but_older_kept() -> None:
    main = [pkg("lib", "1.0", origin="bookworm/main"), pkg("app", depends="lib", origin="bookworm/main")]
    updates = [pkg("lib", "1.1", origin="bookworm-updates/main")]
    u = Universe.from_packages(updates + main, "amd64")
    assert run(u, "app") == {"app": "1.0", "lib": "1.1"}
    u = Universe.from_packages(updates + main + [pkg("old-app", depends="lib (<< 1.1)")], "amd64")
    assert run(u, "old-app") == {"old-app": "1.0", "lib": "1.0"}
    result = resolve(u, ResolveRequest(("app",), base_set="none"))
    assert [p.package.origin for p in result.packages] == ["bookworm/main", "bookworm-updates/main"]


def test_same_version_from_two_origins_is_chosen_by_data_not_order() -> None:
    a = pkg("lib", "1.0", origin="b-suite")
    b = pkg("lib", "1.0", origin="a-suite")
    for order in ([a, b], [b, a]):
        assert Universe.from_packages(order, "amd64").candidate("lib").package.origin == "a-suite"


def test_exact_version_request() -> None:
    u = universe(pkg("lib", "1.0"), pkg("lib", "2.0"))
    assert run(u, "lib=1.0") == {"lib": "1.0"}
    assert run(u, "lib = 2.0") == {"lib": "2.0"}
    with pytest.raises(ResolutionFailed, match="lib has no version 3.0; available versions 2.0, 1.0"):
        run(u, "lib=3.0")


def test_pins_keep_locked_versions_when_possible() -> None:
    u = universe(
        pkg("app", "2.0", depends="lib (>= 1)"),
        pkg("app", "1.0", depends="lib (>= 1)"),
        pkg("lib", "1.0"),
        pkg("lib", "1.5"),
        pkg("tool", "2.0", depends="lib (>= 1.5)"),
    )
    assert run(u, "app") == {"app": "2.0", "lib": "1.5"}
    assert run(u, "app", pins={"app": "1.0", "lib": "1.0"}) == {"app": "1.0", "lib": "1.0"}
    # 'lock --update tool': tool is not pinned and needs a newer lib, so the lib pin gives way.
    assert run(u, "app", "tool", pins={"app": "1.0", "lib": "1.0"}) == {
        "app": "1.0",
        "lib": "1.5",
        "tool": "2.0",
    }


def test_pins_keep_the_locked_alternative() -> None:
    u = universe(pkg("x", depends="a | b"), pkg("a"), pkg("b"))
    assert set(run(u, "x", pins={"x": "1.0", "b": "1.0"})) == {"x", "b"}


# --------------------------------------------------------------------------- recommends


def test_recommends_off_by_default_weak_when_on() -> None:
    u = universe(
        pkg("app", recommends="helper, missing-thing, clash | clash2"),
        pkg("helper", depends="helper-lib"),
        pkg("helper-lib"),
        pkg("clash", conflicts="app"),
        pkg("clash2", depends="nonexistent"),
    )
    assert set(run(u, "app")) == {"app"}
    result = resolve(u, ResolveRequest(("app",), base_set="none", recommends=True))
    reasons = {p.package.name: p.reason for p in result.packages}
    assert reasons == {
        "app": "requested",
        "helper": "recommended by app",
        "helper-lib": "dependency of helper",
    }
    app = next(p for p in result.packages if p.package.name == "app")
    assert app.dependencies == ()  # Recommends are not Depends edges


# --------------------------------------------------------------------------- errors


def test_unknown_package_suggests_close_names() -> None:
    u = universe(pkg("systemd"), pkg("systemd-sysv"), pkg("bash"))
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "sytemd")
    assert "unknown package 'sytemd'" in failure.value.message
    assert "did you mean systemd" in failure.value.message


def test_missing_dependency_explains_the_chain() -> None:
    u = universe(
        pkg("app", "1.2", depends="libfoo (>= 3)"),
        pkg("libfoo", "2.0"),
        pkg("libfoo", "2.5"),
    )
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "app")
    message = failure.value.message
    assert "app 1.2 depends on libfoo (>= 3)" in message
    assert "libfoo: available versions 2.5, 2.0" in message
    assert "To fix this" in message


def test_dependency_on_nonexistent_package_suggests() -> None:
    u = universe(pkg("app", depends="libfooo"), pkg("libfoo"))
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "app")
    assert "libfooo: no such package in any suite (did you mean libfoo?)" in failure.value.message


def test_conflict_deep_in_the_graph_names_both_sides() -> None:
    u = universe(
        pkg("desktop", depends="sound, network"),
        pkg("sound", depends="pulse"),
        pkg("network", depends="netlib (>= 2)"),
        pkg("pulse", depends="netlib (<< 2)"),
        pkg("netlib", "1.0"),
        pkg("netlib", "2.0"),
    )
    with pytest.raises(ResolutionFailed) as failure:
        run(u, "desktop")
    message = failure.value.message
    assert "network 1.0 depends on netlib (>= 2)" in message
    assert "pulse 1.0 depends on netlib (<< 2)" in message
    assert (
        "pulse is wanted because: the user requested desktop → desktop depends on sound → sound depends on pulse"
        in (message)
    )


# --------------------------------------------------------------------------- safety nets


def test_check_consistency_catches_missing_dependency_and_conflict() -> None:
    u = universe(pkg("a", depends="b"), pkg("b", conflicts="c"), pkg("c"), pkg("v", provides="c"))
    check_consistency(u, [u.candidate("a").package, u.candidate("b").package])
    with pytest.raises(InconsistentResolution, match="a 1.0 depends on b"):
        check_consistency(u, [u.candidate("a").package])
    with pytest.raises(InconsistentResolution, match="b 1.0 conflicts with c 1.0"):
        check_consistency(u, [u.candidate(n).package for n in "abc"])
    with pytest.raises(InconsistentResolution, match="b 1.0 conflicts with v 1.0"):
        check_consistency(u, [u.candidate(n).package for n in ("a", "b", "v")])


class CheckingProvider(DebProvider):
    """Asserts resolvelib's contract: every match satisfies every requirement it was found for."""

    calls = 0

    def find_matches(self, identifier: Any, requirements: Any, incompatibilities: Any) -> list[Any]:
        found = super().find_matches(identifier, requirements, incompatibilities)
        for candidate in found:
            assert self.identify(candidate) == identifier
            assert all(self.is_satisfied_by(r, candidate) for r in requirements[identifier])
        CheckingProvider.calls += 1
        return found


def test_find_matches_results_satisfy_requirements() -> None:
    import resolvelib

    u = _scenario_universe()
    provider = CheckingProvider(u, recommends=True, pins={"exim": "4.96"})
    roots = [
        *(u.requirement_for((Relation(n),)) for n in ("app", "mailx", "init")),
    ]
    result = resolvelib.Resolver(provider, resolvelib.BaseReporter()).resolve(roots, max_rounds=1000)
    assert CheckingProvider.calls > 5
    assert any(isinstance(c, AbsentCandidate) for c in result.mapping.values())
    assert PackageKey("app") in result.mapping and isinstance(
        result.mapping[PackageKey("app")], RepoCandidate
    )


def test_progress_reporter_emits_pins() -> None:
    lines: list[str] = []
    resolve(_scenario_universe(), ResolveRequest(("app",), base_set="none"), ProgressReporter(lines.append))
    assert "selecting app 2.0" in lines


# --------------------------------------------------------------------------- determinism


def _scenario_universe() -> Universe:
    text = (DATA / "resolve_scenario.Packages").read_text()
    return Universe.from_packages(
        [BinaryPackage.from_stanza(s, origin="test") for s in iter_stanzas(text)], "amd64"
    )


def test_scenario_file() -> None:
    names = run(_scenario_universe(), "app", "mailx", "init", base_set="minbase")
    assert names == json.loads((DATA / "resolve_scenario.expected.json").read_text())


_DETERMINISM_SCRIPT = """
import json, random, sys
from reprobuild.debian.control import iter_stanzas
from reprobuild.debian.package import BinaryPackage
from reprobuild.resolve import ResolveRequest, Universe, resolve
packages = [BinaryPackage.from_stanza(s, origin="test") for s in iter_stanzas(open(sys.argv[1]).read())]
random.Random(int(sys.argv[2])).shuffle(packages)
result = resolve(Universe.from_packages(packages, "amd64"),
                 ResolveRequest(("app", "mailx", "init"), base_set="minbase", recommends=True))
print(json.dumps([[p.package.name, p.package.version, p.package.origin, p.reason, p.dependencies]
                  for p in result.packages]))
"""


def test_deterministic_under_hash_seed_and_input_order() -> None:
    outputs = set()
    for seed in ("0", "12345"):
        for shuffle in ("1", "2"):
            env = dict(os.environ, PYTHONHASHSEED=seed)
            out = subprocess.run(
                [sys.executable, "-c", _DETERMINISM_SCRIPT, str(DATA / "resolve_scenario.Packages"), shuffle],
                capture_output=True, text=True, check=True, env=env,
            ).stdout  # fmt: skip
            outputs.add(out)
    assert len(outputs) == 1
    assert len(json.loads(outputs.pop())) > 5


def test_host_bookworm_minbase_matches_mmdebstrap() -> None:
    """Optional cross-check on the host's real bookworm index: the minbase set must equal the one
    mmdebstrap (apt) installed from the same suites (recorded in tests/data/resolve_bookworm_minbase.txt).
    Skipped on hosts without a bookworm main amd64 list."""
    import glob

    lists = sorted(glob.glob("/var/lib/apt/lists/*_dists_bookworm_main_binary-amd64_Packages*"))
    if not lists:
        pytest.skip("no bookworm amd64 apt list on this host (optional cross-check)")
    text = subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", lists[0]], capture_output=True, text=True, check=True
    ).stdout
    u = Universe.from_packages((BinaryPackage.from_stanza(s) for s in iter_stanzas(text)), "amd64")
    names = resolve(u, ResolveRequest(())).names()
    assert list(names) == (DATA / "resolve_bookworm_minbase.txt").read_text().split()


# --------------------------------------------------------------------------- cached universe


def _answers(u: Universe, names: list[str]) -> list[Any]:
    """Everything the resolver asks a universe, for comparing two universes."""
    return [
        (n, [c.package for c in u.versions(n)], [c.provides for c in u.versions(n)], u.providers(n), u.exists(n))
        for n in names
    ]


def stanza(p: BinaryPackage) -> str:
    """``p`` as a Packages stanza (the fields BinaryPackage.from_stanza reads)."""
    fields = {
        "Package": p.name, "Version": p.version, "Architecture": p.architecture,
        "Source": f"{p.source} ({p.source_version})", "Filename": p.filename, "Size": str(p.size),
        "SHA256": p.sha256, "Installed-Size": str(p.installed_size), "Multi-Arch": p.multi_arch,
        "Essential": "yes" if p.essential else "no", "Priority": p.priority, "Section": p.section,
        "Depends": p.depends, "Pre-Depends": p.pre_depends, "Recommends": p.recommends,
        "Conflicts": p.conflicts, "Breaks": p.breaks, "Provides": p.provides, "Replaces": p.replaces,
    }  # fmt: skip
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v)


def index_text(*packages: BinaryPackage) -> bytes:
    return "\n".join(stanza(p) for p in packages).encode()


def indexed(*packages: BinaryPackage) -> Universe:
    return Universe.from_indices([IndexText("test", index_text(*packages))], "amd64")


def test_indexed_universe_answers_as_from_packages() -> None:
    scenario = (DATA / "resolve_scenario.Packages").read_bytes()
    updates = [pkg("multi", "2.0", provides="virt (= 2.0), other", origin="updates")]
    main = [
        pkg("multi", "1.0", provides="virt (= 1.0)", origin="main"),
        pkg("multi", "2.0", provides="virt (= 2.0), other", origin="main"),  # same version, 2nd origin
        pkg("ess", "1", essential=True, priority="required", origin="main"),
        pkg("ess", "0.9", origin="main"),
        pkg("foreign", architecture="arm64", provides="virt", origin="main"),  # not this architecture
        pkg("indep", architecture="all", origin="main"),
    ]
    main_all = [  # binary-all of main: "indep" is listed in the arch index too, "only-all" is not
        pkg("indep", architecture="all", origin="main", provides="never-seen"),
        pkg("only-all", architecture="all", origin="main", provides="virt"),
    ]
    texts = [IndexText("test", scenario), IndexText("updates", index_text(*updates)),
             IndexText("main", index_text(*main)), IndexText("main", index_text(*main_all), binary_all=True)]
    indexed_universe = Universe.from_indices(texts, "amd64")
    parsed = [BinaryPackage.from_stanza(s, origin="test") for s in iter_stanzas(scenario.decode())]
    original = Universe.from_packages([*parsed, *updates, *main, main_all[1]], "amd64")
    names = sorted(original._versions) + ["virt", "other", "never-seen", "foreign", "nonexistent"]
    assert _answers(indexed_universe, names) == _answers(original, names)
    assert [c.package.origin for c in indexed_universe.versions("multi")] == ["main", "main"]
    assert indexed_universe.essential_names == original.essential_names and "ess" in original.essential_names
    assert indexed_universe.required_names == original.required_names
    assert indexed_universe.providers("virt") == original.providers("virt") == ("multi", "only-all")
    assert len(indexed_universe) == len(original)
    request = ResolveRequest(("app", "mailx", "init"), base_set="minbase", recommends=True)
    assert resolve(indexed_universe, request) == resolve(original, request)

    cached = Universe.from_bytes(indexed_universe.to_bytes(), [t.text for t in texts])
    assert _answers(cached, names) == _answers(original, names)
    assert (cached.essential_names, cached.required_names) == (original.essential_names, original.required_names)
    assert resolve(cached, request) == resolve(original, request)


def test_cached_universe_decodes_only_what_is_looked_up() -> None:
    u = indexed(pkg("a", depends="b"), pkg("b"), *(pkg(f"unused{i}") for i in range(50)))
    cached = Universe.from_bytes(u.to_bytes(), [t.text for t in u._versions.indices])  # type: ignore[attr-defined]
    assert run(cached, "a") == {"a": "1.0", "b": "1.0"}
    decoded = cached._versions._decoded  # type: ignore[attr-defined]
    assert set(decoded) == {"a", "b"}
    assert cached.versions("a") is cached.versions("a")  # one candidate object per version


def test_cached_universe_rejects_other_data() -> None:
    import marshal

    text = index_text(pkg("a"), pkg("b"))
    good = indexed(pkg("a"), pkg("b")).to_bytes()
    magic, version, arch, indices, names, first, records, providers, essential, required = marshal.loads(good)
    others = [
        b"",
        b"not marshal data",
        good[: len(good) // 2],
        marshal.dumps((magic, version + 1, arch, indices, names, first, records, providers, essential, required)),
        marshal.dumps(("another-magic", version, arch, indices, names, first, records, providers, essential, required)),
        marshal.dumps((magic, version, arch, indices, tuple(names), first, records, providers, essential, required)),
        marshal.dumps((magic, version, arch, indices, names, first[:-8], records, providers, essential, required)),
        marshal.dumps((magic, version, arch, indices, names, first, records[:-1], providers, essential, required)),
        marshal.dumps((magic, version, arch, indices, names, first, records[:-8], providers, essential, required)),
        marshal.dumps((magic, version, arch, indices, names)),
        marshal.dumps((magic, version, arch, indices, names, first, records, {"virt": ("p",)}, essential, required)),
        marshal.dumps((magic, version, arch, indices, names, first, records, providers[:-1], essential, required)),
    ]
    for data in others:
        with pytest.raises(ValueError):
            Universe.from_bytes(data, [text])
    with pytest.raises(ValueError, match="other index texts"):
        Universe.from_bytes(good, [text + b"\n"])
    with pytest.raises(ValueError, match="other index texts"):
        Universe.from_bytes(good, [])
    with pytest.raises(TypeError):
        universe(pkg("a")).to_bytes()  # a universe of parsed packages has no table
    swapped = Universe.from_bytes(good, [index_text(pkg("b"), pkg("a"))])  # same length, other order
    with pytest.raises(RepositoryError, match="another package's"):
        swapped.versions("a")


# --------------------------------------------------------------------------- resolvelib hooks


class NarrowCheckingProvider(DebProvider):
    """Asserts that narrow_requirement_selection picks what min(get_preference) would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks: list[int] = []

    def narrow_requirement_selection(self, identifiers: Any, resolutions: Any, candidates: Any,
                                     information: Any, backtrack_causes: Any) -> list[Any]:  # fmt: skip
        identifiers = list(identifiers)
        picked = super().narrow_requirement_selection(
            identifiers, resolutions, candidates, information, backtrack_causes
        )

        def preference(identifier: Any) -> tuple[int, str]:
            return self.get_preference(identifier, resolutions, candidates, information, backtrack_causes)

        expected = min(identifiers, key=preference)
        assert picked == [expected]
        assert picked == [min(reversed(identifiers), key=preference)]  # the pick ignores the order
        self.ranks.append(preference(expected)[0])
        return picked


def test_narrow_requirement_selection_picks_as_get_preference() -> None:
    import resolvelib

    if not hasattr(resolvelib.AbstractProvider, "narrow_requirement_selection"):
        pytest.skip("resolvelib < 1.1 never calls narrow_requirement_selection")
    u = _scenario_universe()
    request = ResolveRequest(("app", "mailx", "init"), base_set="minbase", recommends=True,
                             pins={"exim": "4.96"})  # fmt: skip
    from reprobuild.resolve import _root_requirements

    provider = NarrowCheckingProvider(u, recommends=True, pins=request.pins)
    roots = [requirement for requirement, _ in _root_requirements(u, request)]
    result = resolvelib.Resolver(provider, resolvelib.BaseReporter()).resolve(roots, max_rounds=1000)
    # Every kind of pick was checked: a needed package (0), an OR group (1), a Recommends group
    # (2) and a package only named by a Conflicts/Breaks (3).
    assert set(provider.ranks) == {0, 1, 2, 3}
    expected = {p.package.name for p in resolve(u, request).packages}
    assert {c.package.name for c in result.mapping.values() if isinstance(c, RepoCandidate)} == expected
