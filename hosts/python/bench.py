#!/usr/bin/env python3
"""Benchmarks of the Python host, printed as a table.

    python hosts/python/bench.py [--driver sqlite|xattr] [--mib 256] [--dir DIR]

- start-up: a new runtime, loading the component (compiled by Cranelift
  the first time, then from the precompiled artifact) and instantiating and
  configuring it on a fresh root;
- a 4 KiB image cached (write session + commit) and read back (read
  session + finish), per image;
- is-cached, per call;
- 256 MiB written and read through the cache, against plain Python file
  I/O of the same bytes in the same run (same chunks, same fdatasync).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from image_cache_wasm import ImageCache, Runtime  # noqa: E402

CHUNK = 1024 * 1024


def timed(fn, repeat: int) -> float:
    """Median seconds of one call over ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", default="sqlite")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--small", type=int, default=300, help="4 KiB images to cache and read")
    ap.add_argument("--dir", default=None, help="where to put the cache roots (default: a temp dir)")
    args = ap.parse_args()

    top = Path(tempfile.mkdtemp(prefix="image-cache-bench-", dir=args.dir))
    rows = []
    try:
        artifacts = top / "artifacts"

        def start(name: str) -> float:
            t = time.perf_counter()
            rt = Runtime(artifacts=artifacts)
            c = ImageCache(top / name, driver=args.driver, runtime=rt, fallback_to_sqlite=False)
            took = time.perf_counter() - t
            c.close()
            rt.close()
            return took

        cold = start("startup-cold")
        warm = statistics.median(start(f"startup-warm-{i}") for i in range(5))
        rows.append(("start-up, first load (compile + instantiate + configure)", f"{cold * 1e3:.1f} ms", ""))
        rows.append(("start-up, precompiled (load + instantiate + configure)", f"{warm * 1e3:.1f} ms", ""))

        cache = ImageCache(top / "root", driver=args.driver, runtime=Runtime(artifacts=artifacts),
                           fallback_to_sqlite=False)
        payload = os.urandom(4096)
        ids = [f"small-{i}" for i in range(args.small)]
        t = time.perf_counter()
        for i in ids:
            cache.cache(i, io.BytesIO(payload))
        put = (time.perf_counter() - t) / len(ids)
        t = time.perf_counter()
        for i in ids:
            assert cache.read(i) == payload
        get = (time.perf_counter() - t) / len(ids)
        # The same 4 KiB with plain Python files: write, fdatasync, rename
        # into place (what a commit must at least do), then read back.
        plain_dir = top / "plain-small"
        plain_dir.mkdir()
        t = time.perf_counter()
        for i in ids:
            tmp, final = plain_dir / f"{i}.tmp", plain_dir / i
            with open(tmp, "wb", buffering=0) as f:
                f.write(payload)
                os.fdatasync(f.fileno())
            os.rename(tmp, final)
        plain_put = (time.perf_counter() - t) / len(ids)
        t = time.perf_counter()
        for i in ids:
            with open(plain_dir / i, "rb") as f:
                assert f.read() == payload
        plain_get = (time.perf_counter() - t) / len(ids)
        rows.append(("4 KiB image: cache (write session + commit)", f"{put * 1e6:.0f} µs",
                     f"plain Python file write + fdatasync + rename: {plain_put * 1e6:.0f} µs"))
        rows.append(("4 KiB image: read (read session + finish)", f"{get * 1e6:.0f} µs",
                     f"plain Python file read: {plain_get * 1e6:.0f} µs"))
        rows.append(("4 KiB image: cache + read", f"{(put + get) * 1e6:.0f} µs",
                     f"plain Python files: {(plain_put + plain_get) * 1e6:.0f} µs"))
        hit = timed(lambda: cache.is_cached(ids[0]), 2000)
        miss = timed(lambda: cache.is_cached("missing"), 2000)
        rows.append(("is-cached (hit)", f"{hit * 1e6:.1f} µs", ""))
        rows.append(("is-cached (miss)", f"{miss * 1e6:.1f} µs", ""))

        # 256 MiB: the same chunks through the cache and through plain files.
        block = os.urandom(CHUNK)
        n = args.mib
        size = n * CHUNK

        def plain_write(path: Path) -> None:
            with open(path, "wb", buffering=0) as f:
                for _ in range(n):
                    f.write(block)
                os.fdatasync(f.fileno())

        def plain_read(path: Path) -> int:
            total = 0
            with open(path, "rb", buffering=0) as f:
                while True:
                    b = f.read(CHUNK)
                    if not b:
                        return total
                    total += len(b)

        def cache_write(image_id: str) -> None:
            with cache.open_for_write(image_id) as w:
                for _ in range(n):
                    w.write(block)

        def cache_read(image_id: str) -> int:
            total = 0
            with cache.open_for_read(image_id) as r:
                while True:
                    b = r.read(CHUNK)
                    if not b:
                        return total
                    total += len(b)

        results = {}
        for round_ in range(2):  # alternate, keep the better of two
            p = top / f"plain-{round_}"
            t = time.perf_counter(); plain_write(p); pw = time.perf_counter() - t
            t = time.perf_counter(); assert plain_read(p) == size; pr = time.perf_counter() - t
            t = time.perf_counter(); cache_write(f"big-{round_}"); cw = time.perf_counter() - t
            t = time.perf_counter(); assert cache_read(f"big-{round_}") == size; cr = time.perf_counter() - t
            for k, v in (("pw", pw), ("pr", pr), ("cw", cw), ("cr", cr)):
                results[k] = min(results.get(k, v), v)
            os.unlink(p)
            cache.delete_cached_image(f"big-{round_}")

        def mbs(seconds: float) -> str:
            return f"{size / seconds / 1e6:.0f} MB/s"

        rows.append((f"{n} MiB write through the cache", mbs(results["cw"]),
                     f"plain Python file: {mbs(results['pw'])} ({results['cw'] / results['pw']:.2f}x the time)"))
        rows.append((f"{n} MiB read through the cache", mbs(results["cr"]),
                     f"plain Python file: {mbs(results['pr'])} ({results['cr'] / results['pr']:.2f}x the time)"))
        cache.close()
    finally:
        shutil.rmtree(top, ignore_errors=True)

    import platform

    try:
        from importlib.metadata import version
        wt = version("wasmtime")
    except Exception:  # noqa: BLE001
        wt = "?"
    print(f"Python host ({args.driver} driver), Python {platform.python_version()}, wasmtime-py {wt}")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what'.ljust(width)} | result | compared with |")
    print(f"| {'-' * width} | --- | --- |")
    for what, value, other in rows:
        print(f"| {what.ljust(width)} | {value} | {other} |")


if __name__ == "__main__":
    main()
