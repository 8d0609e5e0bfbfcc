"""DDI assembly: systemd-dissect recognises it, veritysetup/openssl verify it, builds are identical."""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from reprobuild import x509
from reprobuild.image import ddi, fs, gpt, ids, verity, veritysig

SEED = bytes.fromhex("0123456789abcdef0123456789abcdef")
EPOCH = 1700000000


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddi-in")
    tree = d / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "efi").mkdir()  # systemd-dissect mounts the ESP here and fails without a mount point
    (tree / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (tree / "usr/lib/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (tree / "usr/lib/blob").write_bytes(hashlib.shake_256(b"blob").digest(1 << 20))
    root = d / "root.erofs"
    fs.make_filesystem("erofs", tree, root, ddi.data_fs_uuid(SEED, "amd64"), EPOCH, "root")
    esp_tree = d / "esp"
    (esp_tree / "EFI/BOOT").mkdir(parents=True)
    (esp_tree / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ" + bytes(100))
    esp = d / "esp.vfat"
    fs.make_filesystem("vfat", esp_tree, esp, ddi.esp_fs_uuid(SEED), EPOCH, "esp")
    key_pem, cert_pem = x509.generate_rsa_key_and_certificate("reprobuild ddi test")
    (d / "key.pem").write_bytes(key_pem)
    (d / "cert.pem").write_bytes(cert_pem)
    return d, root, esp


def spec(inputs, out, **kw):
    d, root, esp = inputs
    base = {"architecture": "amd64", "seed": SEED, "root_fs_image": root, "output": out, "verity": "signed",
                "key": d / "key.pem", "certificate": d / "cert.pem", "esp_image": esp}
    base.update(kw)
    return ddi.DdiSpec(**base)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_structure(inputs, tmp_path):
    res = ddi.build_ddi(spec(inputs, tmp_path / "image.raw"))
    assert res.sha256 == sha(tmp_path / "image.raw") and res.size == (tmp_path / "image.raw").stat().st_size
    assert [p.label for p in res.partitions] == ["esp", "root-x86-64", "root-x86-64-verity", "root-x86-64-verity-sig"]
    assert str(res.disk_guid) == "6913f4b6-6690-4a57-a202-f1b53c56dbdf"
    assert str(res.partitions[0].uuid) == "b2d552b0-45db-4678-b34f-066168609d1a"
    esp, root, hashp, sig = res.partitions
    assert root.uuid.hex == res.root_hash[:32] and hashp.uuid.hex == res.root_hash[32:]
    assert root.attributes == hashp.attributes == ids.FLAG_READ_ONLY and sig.attributes == 0
    assert sig.size == 16384 and esp.offset == 1 << 20
    disk = gpt.read_gpt_path(tmp_path / "image.raw")
    assert [p.unique_guid for p in disk.partitions] == [p.uuid for p in res.partitions]
    m = json.loads(json.dumps(res.manifest()))
    assert m["root_hash"] == res.root_hash and len(m["partitions"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.name != "image.raw"]  # no temporary leftovers


def test_partitions_verify(inputs, tmp_path):
    d = inputs[0]
    img = tmp_path / "image.raw"
    res = ddi.build_ddi(spec(inputs, img))
    disk = gpt.read_gpt_path(img)
    for part, name in zip(disk.partitions[1:], ["root", "hash", "sig"]):
        ddi.extract_partition(img, part, 512, tmp_path / name)
    assert (tmp_path / "root").read_bytes() == inputs[1].read_bytes()
    sb = verity.verify_verity(tmp_path / "root", tmp_path / "hash", res.root_hash)
    assert sb.params.salt == ids.verity_salt(SEED) and sb.params.uuid == ids.verity_superblock_uuid(SEED)
    if shutil.which("veritysetup"):
        subprocess.run(["veritysetup", "verify", str(tmp_path / "root"), str(tmp_path / "hash"), res.root_hash],
                       check=True, capture_output=True)
    sig = veritysig.parse_verity_sig((tmp_path / "sig").read_bytes())
    cert = x509.load_certificate((d / "cert.pem").read_bytes())
    veritysig.check_verity_sig(sig, res.root_hash, cert)
    veritysig.check_verity_sig_openssl(sig, d / "cert.pem")


def test_reproducible_under_other_environment(inputs, tmp_path, monkeypatch):
    a = ddi.build_ddi(spec(inputs, tmp_path / "a" / "image.raw"))
    time.sleep(1.1)
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    monkeypatch.setenv("TZ", "America/St_Johns")
    old = os.umask(0o077)
    try:
        b = ddi.build_ddi(spec(inputs, Path("image.raw")))
    finally:
        os.umask(old)
    assert a.sha256 == b.sha256 == sha(tmp_path / "b" / "image.raw")
    assert a.manifest() == b.manifest()


@pytest.mark.parametrize("mode,labels", [
    ("hash", ["root-x86-64", "root-x86-64-verity"]),
    ("no", ["root-x86-64"]),
])
def test_unsigned_modes(inputs, tmp_path, mode, labels):
    res = ddi.build_ddi(spec(inputs, tmp_path / "i.raw", verity=mode, key=None, certificate=None, esp_image=None))
    assert [p.label for p in res.partitions] == labels
    if mode == "no":
        assert res.root_hash is None and res.partitions[0].attributes == ids.FLAG_GROWFS
        assert str(res.partitions[0].uuid) == "9e90c9c3-c7e8-44f2-bf19-9ae2689de795"


def test_usr_layout_arm64_4k(inputs, tmp_path):
    res = ddi.build_ddi(spec(inputs, tmp_path / "i.raw", architecture="arm64", layout="usr", sector_size=4096,
                             esp_image=None))
    assert [p.label for p in res.partitions] == ["usr-arm64", "usr-arm64-verity", "usr-arm64-verity-sig"]
    disk = gpt.read_gpt_path(tmp_path / "i.raw")
    assert disk.sector_size == 4096 and disk.partitions[0].first_lba == 256


@pytest.mark.parametrize("kw,message", [
    ({"key": None}, "needs a key"),
    ({"seed": b"x"}, "16 bytes"),
    ({"architecture": "mips"}, "unsupported architecture"),
    ({"verity": "maybe"}, "verity must be"),
    ({"root_fs_image": Path("/nonexistent")}, "no such file"),
])
def test_bad_specs(inputs, tmp_path, kw, message):
    with pytest.raises(ddi.DdiError, match=message):
        ddi.build_ddi(spec(inputs, tmp_path / "i.raw", **kw))


def test_wrong_certificate_and_unaligned_fs(inputs, tmp_path):
    _, other = x509.generate_rsa_key_and_certificate("other")
    (tmp_path / "other.pem").write_bytes(other)
    with pytest.raises(ddi.DdiError, match="is not the key"):
        ddi.build_ddi(spec(inputs, tmp_path / "i.raw", certificate=tmp_path / "other.pem"))
    (tmp_path / "odd").write_bytes(b"x" * 5000)
    with pytest.raises(ddi.DdiError, match="multiple of 4096"):
        ddi.build_ddi(spec(inputs, tmp_path / "i.raw", root_fs_image=tmp_path / "odd"))
    assert not (tmp_path / "i.raw").exists()


needs_dissect = pytest.mark.skipif(shutil.which("systemd-dissect") is None,
                                   reason="systemd-dissect (systemd-container) missing")


@needs_dissect
def test_systemd_dissect_lists_partitions(inputs, tmp_path):
    res = ddi.build_ddi(spec(inputs, tmp_path / "image.raw"))
    r = subprocess.run(["systemd-dissect", "--json=short", str(tmp_path / "image.raw")], check=False,
                       capture_output=True, text=True)
    if r.returncode != 0 and "loop" in r.stderr.lower():
        pytest.skip(f"systemd-dissect needs loop devices: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    mounts = {m["designator"]: m for m in doc["mounts"]}
    assert set(mounts) == {"root", "root-verity", "root-verity-sig", "esp"}
    assert mounts["root"]["verity"] == "signed" and mounts["root"]["fstype"] == "erofs"
    assert mounts["root"]["architecture"] == "x86-64"
    assert mounts["root"]["partition_uuid"] == str(res.partitions[1].uuid)
    assert mounts["root-verity"]["fstype"] == "DM_verity_hash"
    assert mounts["root-verity-sig"]["fstype"] == "verity_hash_signature"
    assert doc["useBootableUefi"] is True


@needs_dissect
def test_systemd_dissect_copies_from_unprotected_image(inputs, tmp_path):
    """With verity the copy needs device-mapper (often absent in containers); without it, loop+erofs."""
    # No ESP either: systemd-dissect mounts every partition it knows, and vfat may be missing too.
    ddi.build_ddi(spec(inputs, tmp_path / "image.raw", verity="no", key=None, certificate=None, esp_image=None))
    r = subprocess.run(["systemd-dissect", "--copy-from", str(tmp_path / "image.raw"), "/etc/os-release",
                        str(tmp_path / "os-release")], check=False, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"systemd-dissect cannot mount here: {r.stderr.strip()[-200:]}")
    assert (tmp_path / "os-release").read_text().startswith("ID=debian")
