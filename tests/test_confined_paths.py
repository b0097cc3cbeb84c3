"""`confined_path` by itself: the name rules it promises, including those a resolved path alone
would not enforce (a '..' that stays inside the folder is still refused)."""

from __future__ import annotations

import pytest

from tessera.paths import UnsafePathError, confined_path


@pytest.mark.parametrize(
    "name, reason",
    [
        ("a/../b.png", r"'\.\.'"),  # resolves inside the folder, refused all the same
        ("./b.png", r"'\.'"),
        ("a//b.png", "empty parts"),
        ("../b.png", r"'\.\.'"),
        ("/etc/passwd", "relative"),
        ("a\\b.png", "relative"),
        ("b\x00.png", "invalid"),
    ],
)
def test_confined_path_refuses_names_by_rule(tmp_path, name, reason):
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsafePathError, match=reason):
        confined_path(tmp_path, name)


def test_confined_path_accepts_plain_names_and_checks_suffixes(tmp_path):
    (tmp_path / "a").mkdir()
    assert confined_path(tmp_path, "a/b.png") == (tmp_path / "a" / "b.png").resolve()
    assert confined_path(tmp_path, "x.safetensors", (".safetensors",)).name == "x.safetensors"
    with pytest.raises(UnsafePathError, match="must end in"):
        confined_path(tmp_path, "x.ckpt", (".safetensors",))


def test_confined_path_refuses_a_link_that_leads_out(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "door").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="leaves its folder"):
        confined_path(root, "door/secret.png")
