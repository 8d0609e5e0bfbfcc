from pathlib import Path

import pytest

from reprobuild.config import load_spec
from reprobuild.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    write(tmp_path / "reprobuild.conf", "[Distribution]\n")
    spec = load_spec(tmp_path)
    assert spec.distribution.release == "trixie"
    assert spec.distribution.debian_architecture == "amd64"
    assert spec.content.base_set == "minbase"
    assert spec.content.packages == ()
    assert spec.build.root_filesystem == "erofs"


def test_lists_append_across_dropins_and_empty_resets(tmp_path: Path) -> None:
    write(tmp_path / "reprobuild.conf", "[Content]\nPackages=a b\nPackages=c,d\n")
    write(tmp_path / "reprobuild.conf.d/10-more.conf", "[Content]\nPackages=e\n")
    write(tmp_path / "reprobuild.conf.d/20-reset.conf", "[Content]\nPackages=\nPackages=f\n")
    write(tmp_path / "reprobuild.conf.d/05-first.conf", "[Content]\nPackages=z\n")
    assert load_spec(tmp_path).content.packages == ("f",)
    (tmp_path / "reprobuild.conf.d/20-reset.conf").unlink()
    assert load_spec(tmp_path).content.packages == ("a", "b", "c", "d", "z", "e")


def test_include_and_relative_paths(tmp_path: Path) -> None:
    write(tmp_path / "common/base.conf", "[Content]\nExtraTrees=tree\n[Distribution]\nRelease=bookworm\n")
    write(tmp_path / "reprobuild.conf", "[Distribution]\nInclude=common/base.conf\n")
    spec = load_spec(tmp_path)
    assert spec.distribution.release == "bookworm"
    assert spec.content.extra_trees == ((tmp_path / "common/tree").resolve(),)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[Distribution]\nRelease=Trixie!\n", "reprobuild.conf:2: Release=Trixie!"),
        ("[Distrbution]\nRelease=trixie\n", "did you mean [Distribution]"),
        ("[Content]\nPackage=vim\n", "did you mean Packages=?"),
        ("Release=trixie\n", "outside any [Section]"),
        ("[Content]\nRecommends=maybe\n", "reprobuild.conf:2: Recommends=maybe: expected a boolean"),
        ("[Content\n", "malformed section header"),
        ("[Content]\njunk\n", "reprobuild.conf:2: expected Key=Value"),
        ("[Distribution]\nInclude=missing.conf\n", "Include=missing.conf: no such file"),
    ],
    ids=["bad-release", "typo-section", "typo-key", "no-section", "bad-bool", "bad-header", "no-equals", "bad-include"],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    write(tmp_path / "reprobuild.conf", text)
    with pytest.raises(ConfigError) as e:
        load_spec(tmp_path)
    assert message in str(e.value)


def test_include_loop(tmp_path: Path) -> None:
    write(tmp_path / "a.conf", "[Content]\nInclude=reprobuild.conf\n")
    write(tmp_path / "reprobuild.conf", "[Content]\nInclude=a.conf\n")
    with pytest.raises(ConfigError, match="Include= loop"):
        load_spec(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no reprobuild.conf"):
        load_spec(tmp_path)


def test_digest_covers_output_settings_only(tmp_path: Path) -> None:
    write(tmp_path / "reprobuild.conf", "[Content]\nPackages=a\n")
    base = load_spec(tmp_path).digest()
    write(tmp_path / "reprobuild.conf", "[Content]\nPackages=a\n[Distribution]\nMirror=http://127.0.0.1:1/debian\n")
    assert load_spec(tmp_path).digest() == base, "a mirror says where bytes come from, not what they are"
    write(tmp_path / "reprobuild.conf", "[Content]\nPackages=a\nHostname=other\n")
    assert load_spec(tmp_path).digest() != base


def test_digest_does_not_depend_on_checkout_location(tmp_path: Path) -> None:
    for name in ("one", "two"):
        write(tmp_path / name / "reprobuild.conf", "[Content]\nExtraTrees=extra\n")
    assert load_spec(tmp_path / "one").digest() == load_spec(tmp_path / "two").digest()


def test_overrides(tmp_path: Path) -> None:
    write(tmp_path / "reprobuild.conf", "[Distribution]\nRelease=trixie\n")
    assert load_spec(tmp_path, ["Distribution.Release=bookworm"]).distribution.release == "bookworm"
    with pytest.raises(ConfigError, match="Section.Key=Value"):
        load_spec(tmp_path, ["Release=bookworm"])
