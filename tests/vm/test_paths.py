"""Private directories: a runtime directory another user prepared is refused, not used (issue 11, item 6)."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import qemu_processes

from machinen_async import MachinenError, boot
from machinen_async.store import paths, registry

NOBODY = 65534


def test_private_dir_creates_0700_and_refuses_what_is_not_ours(tmp_path):
    created = paths.private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(created.stat().st_mode) == 0o700
    (tmp_path / "loose").mkdir(mode=0o755)
    assert stat.S_IMODE(paths.private_dir(tmp_path / "loose").stat().st_mode) == 0o700
    (tmp_path / "link").symlink_to(created)
    (tmp_path / "file").write_bytes(b"")
    for path, problem in ((tmp_path / "link", "a symlink"), (tmp_path / "file", "not a directory")):
        with pytest.raises(MachinenError) as refused:
            paths.private_dir(path)
        assert refused.value.code == "PATH_NOT_PRIVATE" and problem in refused.value.message


def test_runtime_dir_prefers_the_users_own_tmpfs(monkeypatch):
    monkeypatch.delenv("MACHINEN_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert str(paths.runtime_dir()) == "/run/user/1234/machinen"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert str(paths.runtime_dir()) == f"/dev/shm/machinen-{os.getuid()}"


@pytest.mark.anyio
@pytest.mark.skipif(os.getuid() != 0, reason="creating another user's directory needs root")
async def test_boot_refuses_a_runtime_dir_of_another_user(tmp_path, monkeypatch):
    planted = tmp_path / "runtime"
    planted.mkdir(mode=0o777)
    os.chown(planted, NOBODY, NOBODY)  # what another local user could do at /dev/shm/machinen-<uid>
    monkeypatch.setenv("MACHINEN_RUNTIME_DIR", str(planted))
    with pytest.raises(MachinenError) as refused:
        async with boot(name="planted"):
            pass
    assert refused.value.code == "PATH_NOT_PRIVATE"
    assert f"owned by uid {NOBODY}" in refused.value.message
    assert list(planted.iterdir()) == []  # nothing of ours went in
    assert "planted" not in {entry.name for entry in registry.live_vms()}
    assert not [line for line in qemu_processes() if "planted" in line]
