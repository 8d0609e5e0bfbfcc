"""[Updates]: systemd-sysupdate transfer files (sysupdate.d(5), systemd 257) generated from the
definition, the keyring the image trusts, and the settings' grammar and digest. No build: the
release end to end (transfers inside the released root) is in tests/test_release.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from reprobuild.compression import SUFFIXES
from reprobuild.config import load_spec
from reprobuild.errors import ConfigError
from reprobuild.image.sysupdate import (
    UpdatePlan,
    artifact_name,
    artifact_pattern,
    source_patterns,
    source_type_of,
    transfer_files,
    uki_name,
)
from reprobuild.rootfs.settings import set_updates
from reprobuild.stages.disksettings import update_plan

PLAN = UpdatePlan(image_id="fooos", source="https://updates.example.invalid/fooos/", source_type="url-file",
                  instances_max=2, architecture="x86-64", layout="root", verity="signed", uki=True)

# sysupdate.d(5) of systemd 257 (Debian trixie's systemd-container): the settings of each section.
KNOWN = {"Transfer": {"MinVersion", "ProtectVersion", "Verify", "ChangeLog", "AppStream", "Features",
                      "RequisiteFeatures"},
         "Source": {"Type", "Path", "MatchPattern"},
         "Target": {"Type", "Path", "PathRelativeTo", "MatchPattern", "MatchPartitionType", "PartitionUUID",
                    "PartitionFlags", "PartitionNoAuto", "PartitionGrowFileSystem", "ReadOnly", "Mode", "TriesDone",
                    "TriesLeft", "InstancesMax", "RemoveTemporary", "CurrentSymlink"}}


def _parse(data: bytes) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in data.decode().splitlines():
        if not line:
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None and key not in current, line
        current[key] = value
    return sections


def _matches(pattern: str, name: str) -> dict[str, str] | None:
    """sysupdate's pattern matching for the fields we use: @v (version), @u (UUID), @l/@d (tries)."""
    fields = {"@v": r"(?P<v>[A-Za-z0-9._+~^-]+?)", "@u": r"(?P<u>[0-9a-f-]{36})", "@l": r"(?P<l>[0-9]+)",
              "@d": r"(?P<d>[0-9]+)"}
    regex = "".join(fields.get(tok, re.escape(tok)) for tok in re.split(r"(@[vuld])", pattern))
    m = re.fullmatch(regex, name)
    return m.groupdict() if m else None


def test_signed_root_with_uki_gives_four_transfers_in_install_order() -> None:
    files = transfer_files(PLAN)
    assert list(files) == ["usr/lib/sysupdate.d/40-root-verity-sig.transfer", "usr/lib/sysupdate.d/50-root-verity.transfer",
                           "usr/lib/sysupdate.d/60-root.transfer", "usr/lib/sysupdate.d/70-uki.transfer"]
    assert files["usr/lib/sysupdate.d/60-root.transfer"] == (
        b"[Transfer]\nProtectVersion=%A\nVerify=yes\n\n"
        b"[Source]\nType=url-file\nPath=https://updates.example.invalid/fooos/\nMatchPattern=fooos_@v_@u.root.raw fooos_@v_@u.root.raw.xz "
        b"fooos_@v_@u.root.raw.gz\n\n"
        b"[Target]\nType=partition\nPath=auto\nMatchPattern=fooos_@v\nMatchPartitionType=root-x86-64\nReadOnly=yes\n"
        b"InstancesMax=2\n")
    for data in files.values():
        for section, pairs in _parse(data).items():
            assert set(pairs) <= KNOWN[section], (section, pairs)
    types = {name: _parse(data)["Target"].get("MatchPartitionType") for name, data in files.items()}
    assert sorted(filter(None, types.values())) == ["root-x86-64", "root-x86-64-verity", "root-x86-64-verity-sig"]
    sig = _parse(files["usr/lib/sysupdate.d/40-root-verity-sig.transfer"])["Target"]
    assert "ReadOnly" not in sig  # the signature partition has no read-only flag (ids.default_flags)
    uki = _parse(files["usr/lib/sysupdate.d/70-uki.transfer"])
    assert uki["Target"] == {"Type": "regular-file", "Path": "/EFI/Linux", "PathRelativeTo": "boot",
                             "MatchPattern": "fooos_@v.efi fooos_@v+@l-@d.efi fooos_@v+@l.efi", "Mode": "0444",
                             "InstancesMax": "2"}
    assert _matches(uki["Target"]["MatchPattern"].split()[1], "fooos_3+2-1.efi") == {"v": "3", "l": "2", "d": "1"}


def test_source_patterns_match_the_release_file_names() -> None:
    uuid = "0b7a16f4-42f2-4f1e-8b2a-3c1d5e6f7a8b"
    for role in ("root", "root-verity", "root-verity-sig"):
        assert _matches(artifact_pattern("fooos", role), artifact_name("fooos_2.1", role, uuid)) == {"v": "2.1", "u": uuid}
        assert _matches(artifact_pattern("fooos", role), artifact_name("baros_2.1", role, uuid)) is None
    assert _matches(artifact_pattern("fooos", None), "fooos_7.efi") == {"v": "7"}
    # The [Source] patterns: the release's names as they are, .xz and .gz (release --compress), not .zst.
    for role in ("root", "root-verity", "root-verity-sig", None):
        patterns = source_patterns("fooos", role).split()
        name = artifact_name("fooos_2.1", role, uuid) if role else uki_name("fooos_2.1")
        for compression, suffix in SUFFIXES.items():
            hits = [p for p in patterns if _matches(p, name + suffix)]
            assert len(hits) == (compression != "zstd"), (role, compression, hits)
        uki = _parse(transfer_files(PLAN)["usr/lib/sysupdate.d/70-uki.transfer"])["Source"]["MatchPattern"]
        assert uki == source_patterns("fooos", None)
    # The partition target pattern reads the version from the <id>_<version> label.
    assert _matches(_parse(transfer_files(PLAN)["usr/lib/sysupdate.d/60-root.transfer"])["Target"]["MatchPattern"],
                    "fooos_2.1") == {"v": "2.1"}


def test_layouts_verity_modes_and_sources() -> None:
    local = replace(PLAN, source="/run/updates", source_type="regular-file", verity="hash", layout="usr", uki=False,
                    instances_max=3)
    files = transfer_files(local)
    assert list(files) == ["usr/lib/sysupdate.d/50-usr-verity.transfer", "usr/lib/sysupdate.d/60-usr.transfer"]
    usr = _parse(files["usr/lib/sysupdate.d/60-usr.transfer"])
    assert usr["Transfer"] == {"ProtectVersion": "%A", "Verify": "no"} and usr["Target"]["InstancesMax"] == "3"
    assert usr["Source"]["Type"] == "regular-file" and usr["Target"]["MatchPartitionType"] == "usr-x86-64"
    arm = transfer_files(replace(PLAN, architecture="arm64", verity="no", uki=False))
    assert list(arm) == ["usr/lib/sysupdate.d/60-root.transfer"]
    assert b"MatchPartitionType=root-arm64\n" in arm["usr/lib/sysupdate.d/60-root.transfer"]
    assert b"ReadOnly" not in arm["usr/lib/sysupdate.d/60-root.transfer"]  # Verity=no: a writable ext4 root
    assert source_type_of("file:///srv/rel/") == "url-file" and source_type_of("/srv/rel") == "regular-file"
    with pytest.raises(ValueError):
        source_type_of("srv/rel")
    with pytest.raises(ValueError, match="no regular-file source"):
        transfer_files(replace(PLAN, source_type="regular-file"))
    with pytest.raises(ValueError, match="at least 2"):
        transfer_files(replace(PLAN, instances_max=1))


def _spec(tmp_path: Path, text: str):
    (tmp_path / "reprobuild.conf").write_text(text)
    return load_spec(tmp_path)


class _Lock:
    """What update_plan reads of a lock: whether it has a kernel (an initrd set)."""

    def __init__(self, kernel: bool) -> None:
        self.kernel = kernel

    def has_set(self, name: str) -> bool:
        return self.kernel and name == "initrd"


def test_settings_grammar_digest_and_requirements(tmp_path: Path) -> None:
    plain = _spec(tmp_path, "[Build]\nImageId=fooos\nImageVersion=1\n")
    assert "Updates" not in plain.digest_input() and update_plan(plain, _Lock(False)) is None
    spec = _spec(tmp_path, "[Build]\nImageId=fooos\nImageVersion=1\n[Updates]\nSource=file:///run/rel\nInstancesMax=3\n")
    assert spec.digest_input()["Updates"] == {"Source": "file:///run/rel/", "InstancesMax": 3}
    assert spec.digest() != plain.digest()
    plan = update_plan(spec, _Lock(False))
    assert plan is not None and (plan.source_type, plan.instances_max, plan.uki, plan.verity) == (
        "url-file", 3, False, "hash")
    for bad, message in (("Source=rel", "normalised absolute directory"), ("Source=/a/../b", "normalised"),
                         ("Source=/a b", "spaces"), ("InstancesMax=1", "from 2 to 64")):
        with pytest.raises(ConfigError, match=message):
            _spec(tmp_path, f"[Updates]\n{bad}\n")
    with pytest.raises(ConfigError, match="needs .Build. ImageId= and ImageVersion="):
        update_plan(_spec(tmp_path, "[Updates]\nSource=/run/rel\n"), _Lock(False))
    with pytest.raises(ConfigError, match="settings without Source="):
        update_plan(_spec(tmp_path, "[Updates]\nInstancesMax=3\n"), _Lock(False))
    booted = "[Build]\nImageId=fooos\nImageVersion=1\n[Updates]\nSource=/run/rel\n"
    with pytest.raises(ConfigError, match="needs .Build. Bootloader=systemd-boot"):
        update_plan(_spec(tmp_path, booted), _Lock(True))
    plan = update_plan(_spec(tmp_path, booted + "[Build]\nBootloader=systemd-boot\n"), _Lock(True))
    assert plan is not None and plan.uki and plan.source == "/run/rel"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test OpenPGP key made here: its binary public export, armored export and secret export."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    tmp = tmp_path_factory.mktemp("gpg")
    home = tmp / "home"
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Up <up@example.invalid>", "ed25519",
                        "sign", "never"], env=env, check=True, capture_output=True)
        out = {}
        for name, args in (("pub", ["--export"]), ("asc", ["--export", "--armor"]),
                           ("sec", ["--pinentry-mode", "loopback", "--passphrase", "", "--export-secret-keys"])):
            out[name] = tmp / f"{name}.gpg"
            subprocess.run(["gpg", "--batch", *args, "--output", str(out[name])], env=env, check=True,
                           capture_output=True)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False, capture_output=True)
    return out


def test_set_updates_writes_transfers_and_the_keyring(tmp_path: Path, keys: dict[str, Path]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    written = set_updates(tree, PLAN, keys["pub"], 86400)
    assert written == [*sorted(transfer_files(PLAN)), "etc/systemd/import-pubring.gpg"]
    assert (tree / "etc/systemd/import-pubring.gpg").read_bytes() == keys["pub"].read_bytes()
    for rel in written:
        st = os.stat(tree / rel)
        assert (st.st_mode & 0o7777, st.st_mtime) == (0o644, 86400)
    # What gpg --keyring reads: the keyring verifies nothing by itself, but gpg lists the key from it.
    r = subprocess.run(["gpg", "--batch", "--no-default-keyring", "--homedir", str(tmp_path), "--keyring",
                        str(tree / "etc/systemd/import-pubring.gpg"), "--list-keys"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and "up@example.invalid" in r.stdout
    (tmp_path / "t2").mkdir()
    for name, message in (("asc", "armored"), ("sec", "a secret key")):
        with pytest.raises(ConfigError, match=message):
            set_updates(tmp_path / "t2", PLAN, keys[name], 0)
    assert not any((tmp_path / "t2").iterdir())  # refused before anything is written


def test_boot_counting_only_where_something_blesses_a_boot(tmp_path: Path) -> None:
    """A bootable image with systemd-bless-boot installs a new UKI as <name>+3-0.efi (the first
    target pattern names it, sysupdate.d(5)); one without it keeps <name>.efi, or every new version
    would be given up after three boots."""
    counting = _parse(transfer_files(replace(PLAN, boot_tries=3))["usr/lib/sysupdate.d/70-uki.transfer"])["Target"]
    assert counting["MatchPattern"] == "fooos_@v+@l-@d.efi fooos_@v+@l.efi fooos_@v.efi"
    assert (counting["TriesLeft"], counting["TriesDone"]) == ("3", "0")
    assert set(counting) <= KNOWN["Target"]
    plain = _parse(transfer_files(PLAN)["usr/lib/sysupdate.d/70-uki.transfer"])["Target"]
    assert "TriesLeft" not in plain and plain["MatchPattern"].split()[0] == "fooos_@v.efi"

    def uki_target(tree: Path) -> dict[str, str]:
        set_updates(tree, PLAN, None, 0)
        return _parse((tree / "usr/lib/sysupdate.d/70-uki.transfer").read_bytes())["Target"]

    blessing = tmp_path / "blessing"
    (blessing / "usr/lib/systemd").mkdir(parents=True)
    (blessing / "usr/lib/systemd/systemd-bless-boot").write_bytes(b"\x7fELF")
    assert uki_target(blessing) == counting
    # Reached through the tree's own /usr symlink, as a merged-/usr tree may have it.
    merged = tmp_path / "merged"
    (merged / "opt/u/lib/systemd").mkdir(parents=True)
    (merged / "opt/u/lib/systemd/systemd-bless-boot").write_bytes(b"")
    os.symlink("opt/u", merged / "usr")
    assert uki_target(merged) == counting
    # Not there, a directory, or a symlink out of the tree (resolved inside it: nothing there).
    (tmp_path / "none").mkdir()
    assert uki_target(tmp_path / "none") == plain
    odd = tmp_path / "odd"
    (odd / "usr/lib/systemd/systemd-bless-boot").mkdir(parents=True)
    assert uki_target(odd) == plain
    out = tmp_path / "out"
    (out / "usr/lib/systemd").mkdir(parents=True)
    os.symlink(str(blessing / "usr/lib/systemd/systemd-bless-boot"), out / "usr/lib/systemd/systemd-bless-boot")
    assert uki_target(out) == plain


def test_ab_slots_are_empty_twins_of_fixed_size_and_the_release_is_the_payload(tmp_path: Path) -> None:
    """[Updates] SlotSize=: root and verity padded to their slot, an `_empty` twin of each (same
    type, the type's second seed-derived UUID), verity still verifying over the padded data
    partition, and the release cutting each partition to what was written into it."""
    import hashlib
    import json

    from reprobuild.image import ids, verity
    from reprobuild.image.ddi import DdiError, DdiSpec, build_ddi, extract_partition, slot_sizes
    from reprobuild.image.gpt import read_gpt_path
    from reprobuild.release import write_release

    fs = tmp_path / "root.img"
    fs.write_bytes(bytes(range(256)) * 16 * 20)  # 80 KiB
    slot = 1 << 20
    result = build_ddi(DdiSpec(architecture="amd64", seed=b"\1" * 16, root_fs_image=fs, output=tmp_path / "img.raw",
                               verity="hash", label="fooos_2", slot_size=slot))
    sizes = slot_sizes(slot)
    # 256 data blocks, 128 sha256 digests per hash block: superblock, 2 leaf blocks, the top block.
    assert sizes["hash"] == 4 * 4096
    assert [(p.role, p.label, p.size, p.payload_size) for p in result.partitions] == [
        ("root", "fooos_2", slot, fs.stat().st_size), ("root-verity", "fooos_2", sizes["hash"], 2 * 4096),
        ("root", "_empty", slot, 0), ("root-verity", "_empty", sizes["hash"], 0)]
    root_a, hash_a, root_b, hash_b = result.partitions
    assert (root_b.type_guid, hash_b.type_guid) == (root_a.type_guid, hash_a.type_guid)
    assert root_b.uuid == ids.partition_uuid(b"\1" * 16, root_a.type_guid, 1)
    assert root_b.attributes == root_a.attributes == ids.FLAG_READ_ONLY
    # What sfdisk (util-linux) reads: the labels systemd-sysupdate matches (`_empty`: a free slot).
    if shutil.which("sfdisk"):
        table = json.loads(subprocess.run(["sfdisk", "--json", str(result.path)], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]
        assert [p["name"] for p in table["partitions"]] == ["fooos_2", "fooos_2", "_empty", "_empty"]
    disk = read_gpt_path(result.path)
    extract_partition(result.path, disk.partitions[0], 512, tmp_path / "a.root")
    extract_partition(result.path, disk.partitions[1], 512, tmp_path / "a.verity")
    verity.verify_verity(tmp_path / "a.root", tmp_path / "a.verity", result.root_hash)  # padding is not covered
    rel = write_release(result.path, result.manifest(), tmp_path / "rel", "fooos_2")
    assert [a.source for a in rel.artifacts] == ["root", "root-verity"]  # the empty slots are no artifacts
    assert (tmp_path / "rel" / rel.artifacts[0].file).read_bytes() == fs.read_bytes()
    assert rel.artifacts[1].size == 2 * 4096
    assert rel.artifacts[0].sha256 == hashlib.sha256(fs.read_bytes()).hexdigest()
    with pytest.raises(DdiError, match="larger than a slot"):
        build_ddi(DdiSpec(architecture="amd64", seed=b"\1" * 16, root_fs_image=fs, output=tmp_path / "big.raw",
                          verity="hash", label="fooos_2", slot_size=64 * 1024))
    assert not (tmp_path / "big.raw").exists()


def test_slot_size_grammar(tmp_path: Path) -> None:
    assert _spec(tmp_path, "[Updates]\nSlotSize=2G\n").updates.slot_size == 2 << 30
    assert _spec(tmp_path, "[Updates]\nSlotSize=1536m\n").updates.slot_size == 1536 << 20
    for bad in ("0", "1000", "2X", "-1G"):
        with pytest.raises(ConfigError, match="SlotSize="):
            _spec(tmp_path, f"[Updates]\nSlotSize={bad}\n")


def test_ab_signature_partitions_of_two_versions_never_share_a_uuid(tmp_path: Path) -> None:
    """Every version of one definition shares the seed; systemd-sysupdate copies a released
    partition's UUID (@u) onto the disk. So in an A/B image the signature partition's UUID comes
    from the root hash (as the root and verity UUIDs do), else version 2 would repeat version 1's."""
    from reprobuild.image import ids
    from reprobuild.image.ddi import DdiSpec, build_ddi
    from reprobuild.signer import file_signer
    from reprobuild.x509 import generate_rsa_key_and_certificate

    key, cert = generate_rsa_key_and_certificate("ab test")
    signer = file_signer(key, cert)
    sig_uuids = []
    for version, fill in (("1", b"\1"), ("2", b"\2")):
        fs = tmp_path / f"root{version}.img"
        fs.write_bytes(fill * 8192)
        result = build_ddi(DdiSpec(architecture="amd64", seed=b"\7" * 16, root_fs_image=fs, signer=signer,
                                   output=tmp_path / f"v{version}.raw", label=f"fooos_{version}", slot_size=1 << 20))
        sig = [p for p in result.partitions if p.role == "root-verity-sig"]
        assert [p.label for p in sig] == [f"fooos_{version}", "_empty"]
        assert sig[0].uuid == ids.versioned_sig_uuid(bytes.fromhex(result.root_hash))
        sig_uuids += [p.uuid for p in sig]
    assert len(set(sig_uuids)) == 3  # v1's, v2's, and the (same) empty slot's
    # Without slots the signature partition keeps systemd-repart's seed-derived UUID.
    plain = build_ddi(DdiSpec(architecture="amd64", seed=b"\7" * 16, root_fs_image=tmp_path / "root1.img",
                              signer=signer, output=tmp_path / "plain.raw", label="fooos_1"))
    sig_type = ids.partition_type(ids.Role.ROOT_VERITY_SIG, ids.Architecture.AMD64).guid
    assert [p.uuid for p in plain.partitions if p.role == "root-verity-sig"] == [
        ids.partition_uuid(b"\7" * 16, sig_type, 0)]
