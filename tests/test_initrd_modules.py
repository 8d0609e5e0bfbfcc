from pathlib import Path

from reprobuild.image.initrd import select_kernel_modules


def test_softdeps_are_followed_through_aliases(tmp_path: Path) -> None:
    """erofs → libcrc32c, whose softdep 'pre: crc32c' is an alias of two implementations."""
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n"
        "kernel/lib/libcrc32c.ko.xz:\n"
        "kernel/arch/x86/crypto/crc32c-intel.ko.xz:\n"
        "kernel/crypto/crc32c_generic.ko.xz:\n"
        "kernel/fs/unrelated.ko.xz:\n"
    )
    (tmp_path / "modules.softdep").write_text("# Soft dependencies\nsoftdep libcrc32c pre: crc32c\n")
    (tmp_path / "modules.alias").write_text(
        "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\nalias cpu:type:x86* crc32c_intel\n")
    selected = [p.relative_to(tmp_path).as_posix() for p in select_kernel_modules(tmp_path, ["erofs"])]
    assert selected == ["kernel/lib/libcrc32c.ko.xz", "kernel/fs/erofs/erofs.ko.xz",
                        "kernel/arch/x86/crypto/crc32c-intel.ko.xz", "kernel/crypto/crc32c_generic.ko.xz"]
    # An alias asked for directly selects its modules too.
    assert len(select_kernel_modules(tmp_path, ["crc32c"])) == 2
