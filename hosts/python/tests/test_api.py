"""The Pythonic API beyond the shared scenarios: files and readers in and
out, checksums, context managers, driver selection, fallback and swap."""

from __future__ import annotations

import hashlib
import io
import os
import threading

import pytest

from conftest import REPO, component
from image_cache_wasm import (
    AlreadyCached,
    BadConfiguration,
    ChecksumMismatch,
    ImageCache,
    InvalidImageId,
    LoadError,
    NotFound,
    Runtime,
    SourceError,
)


def test_cache_a_file_object_and_read_it_back(cache, tmp_path):
    src = tmp_path / "disk.img"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data)
    with open(src, "rb") as f:
        assert cache.cache("img", f) == len(data)  # copied natively (fd to fd)
    assert cache.get_image_size("img") == len(data)
    with cache.open_for_read("img") as image:
        assert image.size == len(data)
        assert image.read() == data
    assert cache.get_hit_count("img") == 1
    out = tmp_path / "out.img"
    with open(out, "wb") as sink:
        assert cache.read_into("img", sink) == len(data)  # sendfile
    assert out.read_bytes() == data
    assert cache.get_hit_count("img") == 2
    with pytest.raises(AlreadyCached):
        cache.cache("img", io.BytesIO(b"again"))


def test_checksums_are_verified_before_the_commit(cache):
    data = b"an image" * 1000
    for algorithm in ("md5", "sha256", "sha512"):
        digest = hashlib.new(algorithm, data).hexdigest()
        cache.cache(f"ok-{algorithm}", io.BytesIO(data), checksum=f"{algorithm}:{digest}")
    cache.cache("bare-md5", io.BytesIO(data), checksum=hashlib.md5(data).hexdigest())
    with pytest.raises(ChecksumMismatch) as e:
        cache.cache("bad", io.BytesIO(data), checksum="sha256:" + "0" * 64)
    assert e.value.image_id == "bad"
    assert not cache.is_cached("bad")
    assert os.listdir(cache.root / "invalid") == ["bad"]
    with pytest.raises(ValueError):
        cache.cache("x", io.BytesIO(data), checksum="crc32:1234")


def test_a_failing_source_is_reported_and_nothing_is_cached(cache):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise OSError("disk on fire")

    with pytest.raises(SourceError, match="disk on fire"):
        cache.cache("1", Broken(), checksum="md5:" + "0" * 32)
    assert not cache.is_cached("1")
    assert os.listdir(cache.root / "invalid") == ["1"]


def test_the_writer_context_manager_commits_or_aborts(cache):
    with cache.open_for_write("good") as w:
        w.write(b"whole")
    assert cache.read("good") == b"whole"
    with pytest.raises(RuntimeError):
        with cache.open_for_write("bad") as w:
            w.write(b"half")
            raise RuntimeError("the upload broke")
    assert not cache.is_cached("bad")
    assert os.listdir(cache.root / "invalid") == ["bad"]


def test_a_reader_closed_early_counts_nothing(cache):
    cache.cache("1", io.BytesIO(b"0123456789"))
    with cache.open_for_read("1") as r:
        assert r.read(3) == b"012"
    assert cache.get_hit_count("1") == 0
    with cache.open_for_read("1") as r:
        assert b"".join(r) == b"0123456789"
    assert cache.get_hit_count("1") == 1
    with pytest.raises(NotFound):
        cache.open_for_read("2")


def test_a_reader_reports_the_checksum_the_image_was_cached_with(cache):
    data = b"checksummed image" * 500
    md5 = hashlib.md5(data).hexdigest()
    sha256 = hashlib.sha256(data).hexdigest()
    cache.cache("md5", io.BytesIO(data), checksum=f"md5:{md5}")
    cache.cache("bare", io.BytesIO(data), checksum=md5.upper())  # Glance's bare md5
    assert b"".join(cache.cache_stream("sha", [data], checksum=f"sha256:{sha256}")) == data
    for image_id, expected in [("md5", f"md5:{md5}"), ("bare", f"md5:{md5}"), ("sha", f"sha256:{sha256}")]:
        with cache.open_for_read(image_id) as r:
            assert r.checksum() == expected
            assert r.checksum() == expected, "asking again is fine: the read goes on"
            assert not r.closed
            assert r.read() == data, "the read still completes"
            assert r.closed
            assert r.checksum() is None, "the read has ended"
        assert cache.get_hit_count(image_id) == 1, "and counts the hit"
    # Half a read, a checksum, then the rest: one hit more.
    with cache.open_for_read("md5") as r:
        assert r.read(10) == data[:10]
        assert r.checksum() == f"md5:{md5}"
        assert r.read() == data[10:]
    assert cache.get_hit_count("md5") == 2
    assert cache.driver.discarded == 0


def test_a_reader_of_an_image_cached_without_a_checksum_reports_none(cache, tmp_path):
    cache.cache("plain", io.BytesIO(b"no checksum"))
    with cache.open_for_read("plain") as r:
        assert r.checksum() is None
        assert r.read() == b"no checksum"
    assert cache.get_hit_count("plain") == 1
    # A checksum, then a reader closed early: still nothing counted.
    with cache.open_for_read("plain") as r:
        assert r.checksum() is None
    assert cache.get_hit_count("plain") == 1
    # Through sendfile after the checksum.
    with cache.open_for_read("plain") as r, open(tmp_path / "out", "wb") as sink:
        assert r.checksum() is None
        assert r.copy_to(sink) == len(b"no checksum")
    assert cache.get_hit_count("plain") == 2


def test_only_checksums_that_fit_in_a_header_are_usable():
    from image_cache_wasm.driver import usable_checksum

    for good in ["md5:" + "a" * 32, "0" * 32, "sha256:" + "F" * 64, "x" * 128, "b64+/=_-:Zz9"]:
        assert usable_checksum(good), good
    for bad in ["", "x" * 129, "0123\r\nSet-Cookie: stolen=1", "md5 abc", 'md5:"abc"', "é", "md5:\x00", None, 7]:
        assert not usable_checksum(bad), bad


def test_invalid_ids_touch_nothing(cache):
    before = sorted(os.listdir(cache.root))
    for bad in ["", ".", "..", "a/b", "../x", "x\0y", "x" * 256]:
        with pytest.raises(InvalidImageId):
            cache.open_for_write(bad)
        with pytest.raises(InvalidImageId):
            cache.cache(bad, io.BytesIO(b"x"))
    assert sorted(os.listdir(cache.root)) == before
    assert os.listdir(cache.root / "incomplete") == []


def test_the_tee_keeps_flowing_when_the_image_is_being_cached(cache):
    w = cache.open_for_write("busy")
    tee = cache.cache_stream("busy", [b"a", b"b"])
    assert b"".join(tee) == b"ab"
    assert tee.report.cached is False and tee.report.cache_error is None
    w.write(b"mine")
    w.commit()
    assert cache.read("busy") == b"mine"


def test_list_cached_prune_and_clean_reports(cache):
    for i in range(3):
        cache.cache(str(i), io.BytesIO(b"x" * 100))
    assert [i["image_id"] for i in cache.list_cached()] == ["0", "1", "2"]
    report = cache.prune(150)
    assert [r["image_id"] for r in report["removed"]] == ["0", "1"]
    assert report["bytes_removed"] == 200 and report["size_after"] == 100
    (cache.root / "invalid" / "junk").write_bytes(b"j")
    assert [r["image_id"] for r in cache.clean()["invalid"]] == ["junk"]


def test_a_prune_too_long_for_one_call_takes_several(tmp_path, runtime):
    # Each driver call evicts for image_cache_evict_seconds at most; with 0
    # every call takes one batch (100 images): 250 go in three calls,
    # reported as one, least recently accessed first.
    c = ImageCache(
        tmp_path / "root", driver="sqlite", runtime=runtime, options=[("image_cache_evict_seconds", "0")]
    )
    try:
        for i in range(250):
            c.cache(f"img-{i:03}", io.BytesIO(b"0123456789"))
        report = c.prune(0)
        ids = [r["image_id"] for r in report["removed"]]
        assert ids == sorted(ids) and len(ids) == 250, report["failures"]
        assert report["bytes_removed"] == 2500 and report["size_after"] == 0
        for i in range(120):
            c.cache(f"again-{i:03}", io.BytesIO(b"x"))
        assert c.delete_all_cached_images() == 120
        assert c.list_cached() == []
    finally:
        c.close()


def test_threads_share_one_cache(cache):
    cache.cache("shared", io.BytesIO(b"y" * 4096))
    errors = []

    def work(n):
        try:
            for k in range(20):
                cache.cache(f"t{n}-{k}", io.BytesIO(b"z" * 100))
                assert cache.read("shared") == b"y" * 4096
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cache.get_hit_count("shared") == 120
    assert len(cache.list_cached()) == 121


def test_swap_driver_at_runtime_keeps_the_images(tmp_path, runtime):
    component("sqlite_driver")
    component("xattr_driver")
    c = ImageCache(tmp_path / "root", driver="sqlite", runtime=runtime)
    c.cache("1", io.BytesIO(b"kept"))
    reader = c.open_for_read("1")  # a session open across the swap
    c.swap_driver("xattr")
    assert c.driver_name == "xattr"
    assert reader.read() == b"kept", "a session finishes on the driver it began on"
    assert c.is_cached("1")
    assert c.read("1") == b"kept"
    c.swap_driver(component("sqlite_driver"))
    assert c.is_cached("1")
    c.close()


def test_xattr_unsupported_falls_back_to_sqlite_unless_told_not_to(tmp_path, runtime):
    component("xattr_driver")
    component("sqlite_driver")
    c = ImageCache(tmp_path / "a", driver="xattr", xattr=False, runtime=runtime)
    assert c.driver_name == "sqlite"
    c.close()
    with pytest.raises(BadConfiguration) as e:
        ImageCache(tmp_path / "b", driver="xattr", xattr=False, runtime=runtime, fallback_to_sqlite=False)
    assert "xattr" in str(e.value)


def test_a_root_that_cannot_be_used_is_a_bad_configuration(tmp_path, runtime):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BadConfiguration) as e:
        ImageCache(tmp_path / "file", runtime=runtime)
    assert str(tmp_path / "file") in str(e.value), "the operator's message names the root"


def test_components_are_found_by_argument_then_environment(tmp_path, runtime, monkeypatch):
    with pytest.raises(LoadError, match="no component at"):
        ImageCache(tmp_path / "root", components=tmp_path / "nowhere", runtime=runtime)
    monkeypatch.setenv("IMAGE_CACHE_COMPONENTS_DIR", str(tmp_path / "nowhere-either"))
    with pytest.raises(LoadError, match="nowhere-either"):
        ImageCache(tmp_path / "root", runtime=runtime)


def test_a_component_of_another_contract_version_is_refused(tmp_path, runtime):
    old = REPO / "tests" / "fixtures" / "contract-0.1.0" / "sqlite_driver.wasm"
    with pytest.raises(LoadError) as e:
        ImageCache(tmp_path / "root", driver=old, runtime=runtime, fallback_to_sqlite=False)
    assert "it speaks contract image-cache:driver@0.1.0; this host runs >=0.3.0, <0.4.0" in str(e.value)
    assert "imported WASI" in str(e.value)


@pytest.mark.parametrize("name", ["sqlite_driver", "xattr_driver", "centralized_driver"])
def test_a_component_of_contract_0_2_is_refused_before_it_is_compiled(tmp_path, name):
    old = REPO / "tests" / "fixtures" / "contract-0.2.0" / f"{name}.wasm"
    runtime = Runtime(artifacts=None)
    for grants in ([], ["xattr"], ["sqlite", "xattr"]):
        with pytest.raises(LoadError) as e:
            ImageCache(tmp_path / "root", driver=old, grants=grants, runtime=runtime,
                       fallback_to_sqlite=False)
        m = str(e.value)
        assert m.startswith(f"cannot load driver {old}: it speaks contract image-cache:driver@0.2.0; "
                            "this host runs >=0.3.0, <0.4.0 ("), m
        assert "retired the host-side `sqlite` import" in m, m
    assert runtime.stats["compiled"] == 0, "refused from its binary's names, before compilation"
    assert not (tmp_path / "root" / "incomplete").exists(), "nothing ran"


def test_what_a_component_imports_is_checked_against_the_contract():
    from image_cache_wasm.contract import check_names

    export = ["image-cache:driver/cache-driver@0.3.0"]
    base = ["image-cache:driver/fs@0.3.0", "image-cache:driver/clock@0.3.0", "image-cache:driver/types@0.3.0"]
    check_names("d", base, export, frozenset())
    check_names("d", base + ["image-cache:driver/xattr@0.3.0"], export, frozenset({"xattr"}))
    # The host offers `database` (PostgreSQL) to a driver granted it.
    check_names("d", base + ["image-cache:driver/database@0.3.0"], export, frozenset({"database"}))
    cases = [
        (base + ["image-cache:driver/sqlite@0.3.0"], export,
         "it imports image-cache:driver/sqlite@0.3.0: contract 0.3.0 retired the host-side sqlite "
         "interface (SQLite runs inside the driver, over fs); this host runs >=0.3.0, <0.4.0"),
        (base + ["image-cache:driver/sqlite@0.2.0"], export,
         "it imports image-cache:driver/sqlite@0.2.0 but exports contract 0.3.0: one component speaks "
         "one contract version (this host runs >=0.3.0, <0.4.0)"),
        (["image-cache:driver/fs@0.2.0"], export, "it imports image-cache:driver/fs@0.2.0 but exports contract 0.3.0"),
        (base + ["image-cache:driver/xattr@0.3.0"], export,
         "it imports image-cache:driver/xattr@0.3.0, which it was not granted (granted: fs, clock)"),
        (base + ["image-cache:driver/database@0.3.0"], export,
         "it imports image-cache:driver/database@0.3.0, which it was not granted (granted: fs, clock)"),
        (base + ["image-cache:driver/network@0.3.0"], export,
         "it imports image-cache:driver/network@0.3.0, which this host does not offer"),
        (base + ["wasi:io/streams@0.2.6"], export,
         "it imports wasi:io/streams@0.2.6, which is not part of the driver contract"),
        (base, ["image-cache:driver/cache-driver@0.4.0"],
         "it speaks contract image-cache:driver@0.4.0; this host runs >=0.3.0, <0.4.0"),
        (base, ["image-cache:driver/cache-driver@0.3.1"],
         "it speaks contract image-cache:driver@0.3.1; this host runs >=0.3.0, <0.4.0"),
        (base, ["image-cache:driver/cache-driver@1.0.0"], "it speaks contract image-cache:driver@1.0.0"),
        (base, ["image-cache:driver/cache-driver@0.3"], "its contract version '0.3' is not a version"),
        (base, ["run"], "it exports no image-cache:driver/cache-driver interface (exports: run)"),
    ]
    for imports, exports, expected in cases:
        with pytest.raises(LoadError) as e:
            check_names("d", imports, exports, frozenset())
        assert f"cannot load driver d: {expected}" in str(e.value), (expected, str(e.value))


def test_grants_are_checked_and_the_retired_sqlite_grant_is_accepted(tmp_path, runtime):
    from image_cache_wasm.contract import normalize_grants

    assert normalize_grants(["xattr", "fs", "clock", "sqlite"]) == frozenset({"xattr"})
    assert normalize_grants([]) == frozenset()
    with pytest.raises(LoadError, match="unknown capability 'network': grant any of xattr, database"):
        normalize_grants(["network"], "d")
    component("sqlite_driver")
    c = ImageCache(tmp_path / "root", driver=component("sqlite_driver"), grants=["sqlite"],
                   runtime=runtime, fallback_to_sqlite=False)
    assert c.driver.loaded.grants == frozenset()
    c.cache("1", io.BytesIO(b"x"))
    assert c.is_cached("1")
    c.close()


def test_a_core_module_is_refused_by_name(tmp_path, runtime):
    core = tmp_path / "core.wasm"
    core.write_bytes(b"\0asm\x01\0\0\0")
    with pytest.raises(LoadError, match="it is a core WebAssembly module, not a component"):
        runtime.load(core)


def test_precompiled_artifacts_are_reused(tmp_path):
    component("sqlite_driver")
    first = Runtime(artifacts=tmp_path / "artifacts")
    ImageCache(tmp_path / "a", runtime=first).close()
    assert first.stats["compiled"] == 1
    second = Runtime(artifacts=tmp_path / "artifacts")
    ImageCache(tmp_path / "b", runtime=second).close()
    assert second.stats == {**second.stats, "compiled": 0, "loaded_precompiled": 1}


def test_the_components_import_only_the_contract(runtime):
    expected = {
        "sqlite_driver": {"clock", "fs", "types"},
        "xattr_driver": {"clock", "fs", "types", "xattr"},
        "centralized_driver": {"clock", "fs", "types", "database"},
    }
    for name, interfaces in expected.items():
        loaded = runtime.load(component(name), grants=interfaces & {"xattr", "database"})
        assert set(loaded.imports) == {f"image-cache:driver/{i}@0.3.0" for i in interfaces}, loaded.imports


def test_the_readme_example_runs(capsys):
    component("sqlite_driver")
    component("xattr_driver")
    # The repository README's Python section, or the book's page it moved to.
    readme = (REPO / "README.md").read_text()
    if "### Embedding in Python" in readme:
        section = readme[readme.index("### Embedding in Python"):]
    else:
        section = (REPO / "docs" / "src" / "embedding" / "python.md").read_text()
    start = section.index("<<'PY'\n") + len("<<'PY'\n")
    example = section[start:section.index("\nPY\n", start)]
    exec(compile(example, "README.md (Embedding in Python)", "exec"), {})
    out = capsys.readouterr().out
    assert "b'disk image bytes' 1" in out
    assert "'bytes_removed': 16" in out


def test_a_host_bug_is_a_fault_for_that_call_only(cache, monkeypatch):
    from image_cache_wasm import DriverFault
    from image_cache_wasm.fs import RootFs

    def broken(self, path):
        raise ZeroDivisionError("host bug")

    with monkeypatch.context() as m:
        m.setattr(RootFs, "stat", broken)
        with pytest.raises(DriverFault, match=r"the host failed while serving it \(ZeroDivisionError\)"):
            cache.is_cached("1")
    assert cache.driver.discarded == 1
    assert cache.is_cached("1") is False, "the next call works"


def test_sizes_are_accepted_as_glance_writes_them(cache):
    from image_cache_wasm.cache import parse_size

    assert parse_size("10G") == 10 * 1024**3
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("1048576") == 1048576
    assert parse_size(7) == 7
    for bad in ["-1", "10X", "", "G", -1]:
        with pytest.raises(ValueError):
            parse_size(bad)
    cache.cache("1", io.BytesIO(b"x" * 2048))
    assert cache.prune("1K")["removed"][0]["image_id"] == "1"
