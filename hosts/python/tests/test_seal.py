"""The host's seal (as ``host/src/driver.rs``): every image committed
through the host carries ``user.image-cache.id = <id>`` on its file, set by
the host before the driver's commit; a read session that hands back a file
sealed as another id is a driver fault before a byte is served. Files
without a seal (release 0.2's, Glance's, a file system without user
attributes) are read as before."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest

from image_cache_wasm import DriverFault
from image_cache_wasm.xattr import SEAL


def require_user_xattrs(d: Path) -> None:
    """Skip (saying why) where the file system stores no user attributes:
    no seal can be set there."""
    probe = d / ".seal-test-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.seal-test", b"1")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            reason = f"{d}: the file system stores no user extended attributes ({e.strerror}): no seals here"
            print(f"skipped: {reason}")
            pytest.skip(reason)
        raise
    finally:
        probe.unlink()


def test_an_image_committed_through_the_host_carries_its_seal(cache):
    require_user_xattrs(cache.root)
    cache.cache("img-1", io.BytesIO(b"sealed bytes"))
    with cache.open_for_write("img-2") as w:
        w.write(b"written, then committed")
    assert os.getxattr(cache.root / "img-1", SEAL) == b"img-1"
    assert os.getxattr(cache.root / "img-2", SEAL) == b"img-2"
    # Aborted or dropped writes are never sealed (the seal comes at commit).
    with cache.open_for_write("aborted") as w:
        w.write(b"half")
        w.abort("no")
    assert os.listdir(cache.root / "invalid") == ["aborted"]
    with pytest.raises(OSError) as e:
        os.getxattr(cache.root / "invalid" / "aborted", SEAL)
    assert e.value.errno == errno.ENODATA
    # A sealed image reads as before.
    assert cache.read("img-1") == b"sealed bytes"


def test_a_file_sealed_as_another_image_is_refused_before_a_byte_is_read(cache):
    require_user_xattrs(cache.root)
    cache.cache("A", io.BytesIO(b"image A"))
    cache.cache("B", io.BytesIO(b"image B"))
    # B's file now says it was committed as A (as if a driver had renamed
    # A's file over B).
    os.setxattr(cache.root / "B", SEAL, b"A")
    stats = cache.driver.runtime.stats
    discarded = stats["instances_discarded"]
    atime = os.stat(cache.root / "B").st_atime_ns
    with pytest.raises(DriverFault) as e:
        cache.open_for_read("B")
    m = e.value.message
    assert 'it broke the driver contract: the read session of "B" handed back the file committed as "A"' in m, m
    assert stats["instances_discarded"] == discarded + 1, "the instance is discarded"
    assert os.stat(cache.root / "B").st_atime_ns == atime, "nothing was read"
    with pytest.raises(DriverFault):
        cache.read("B")
    assert cache.get_hit_count("B") == 0, "no read counted"
    # The next call works; A is untouched.
    assert cache.read("A") == b"image A"
    # Its own seal, or none at all (release 0.2, Glance), reads as before.
    os.setxattr(cache.root / "B", SEAL, b"B")
    assert cache.read("B") == b"image B"
    os.removexattr(cache.root / "B", SEAL)
    assert cache.read("B") == b"image B"
    assert cache.get_hit_count("B") == 2
