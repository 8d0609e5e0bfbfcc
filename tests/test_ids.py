"""repart-compatible identifiers: docs/formats.md §4 vectors (verified against systemd-repart 252)."""

import uuid

import pytest

from reprobuild.image import ids

SEED = bytes.fromhex("0123456789abcdef0123456789abcdef")
X86 = ids.Architecture.AMD64


def test_disk_uuid_vector():
    assert ids.disk_uuid(SEED) == uuid.UUID("6913f4b6-6690-4a57-a202-f1b53c56dbdf")


def test_partition_uuids_with_counter_vector():
    types = [ids.partition_type(ids.Role.ESP), ids.partition_type(ids.Role.ROOT, X86),
             ids.partition_type(ids.Role.ROOT, X86), ids.partition_type(ids.Role.ROOT_VERITY, X86)]
    got = ids.partition_uuids(SEED, [t.guid for t in types])
    assert [str(u) for u in got] == [
        "b2d552b0-45db-4678-b34f-066168609d1a",
        "9e90c9c3-c7e8-44f2-bf19-9ae2689de795",
        "7f48db1a-b817-4c23-a5d2-cde068eb2163",
        "73c2a0af-74a0-49c3-9750-b40b24e40274",
    ]
    assert ids.default_labels(types) == ["esp", "root-x86-64", "root-x86-64-2", "root-x86-64-verity"]


def test_verity_salt_and_superblock_uuid_vector():
    assert ids.verity_salt(SEED).hex() == "c65b6ab68edf421fcc0cb48ba60f7f14f5186b4d003d21ab3b334b91de16759c"
    assert ids.verity_superblock_uuid(SEED) == uuid.UUID("898929e6-7747-423e-8593-3659ba461e7c")


def test_verity_partition_uuids_are_unmasked_root_hash_halves():
    rh = bytes.fromhex("9aaa750b24ed1124a8ab9fdf60df67422c9617a9fbbedf05ae83abc758faffd1")
    data, hashp = ids.verity_partition_uuids(rh)
    assert data.hex == rh.hex()[:32] and hashp.hex == rh.hex()[32:]


def test_derived_uuids_are_v4():
    u = ids.fs_uuid(ids.partition_uuid(SEED, ids.partition_type(ids.Role.ROOT, X86).guid))
    assert u.version == 4 and u.variant == uuid.RFC_4122


@pytest.mark.parametrize("arch,role,label", [
    (X86, ids.Role.ROOT_VERITY_SIG, "root-x86-64-verity-sig"),
    (ids.Architecture.ARM64, ids.Role.USR, "usr-arm64"),
    (ids.Architecture.ARM64, ids.Role.USR_VERITY, "usr-arm64-verity"),
    (None, ids.Role.XBOOTLDR, "xbootldr"),
])
def test_default_labels(arch, role, label):
    assert ids.partition_type(role, arch).default_label == label


def test_type_table_and_reverse_lookup():
    assert ids.partition_type(ids.Role.ROOT, ids.Architecture.ARM64).guid == uuid.UUID(
        "b921b045-1df0-41c3-af44-4c6f280d3fae")
    t = ids.type_by_guid(uuid.UUID("41092b05-9fc8-4523-994f-2def0408b176"))
    assert t.role is ids.Role.ROOT_VERITY_SIG and t.architecture is X86
    assert ids.type_by_guid(uuid.UUID(int=1)) is None
    with pytest.raises(ValueError):
        ids.partition_type(ids.Role.ROOT)


def test_default_flags_follow_repart():
    assert ids.default_flags(ids.Role.ROOT) == ids.FLAG_GROWFS == 1 << 59
    assert ids.default_flags(ids.Role.ROOT, verity_data=True) == ids.FLAG_READ_ONLY == 1 << 60
    assert ids.default_flags(ids.Role.ROOT_VERITY) == ids.FLAG_READ_ONLY
    assert ids.default_flags(ids.Role.ROOT_VERITY_SIG) == 0
    assert ids.default_flags(ids.Role.ESP) == 0


def test_bad_seed_rejected():
    with pytest.raises(ValueError):
        ids.disk_uuid(b"short")


def test_versioned_labels_name_every_partition_but_the_esp():
    arch = ids.Architecture.AMD64
    types = [ids.partition_type(ids.Role.ESP), ids.partition_type(ids.Role.ROOT, arch),
             ids.partition_type(ids.Role.ROOT_VERITY, arch), ids.partition_type(ids.Role.ROOT_VERITY_SIG, arch)]
    assert ids.versioned_labels(types, "fooos_2") == ["esp", "fooos_2", "fooos_2", "fooos_2"]
    assert ids.versioned_labels(types, None) == ids.default_labels(types)
