"""glance-api as an operator runs it, switched onto the components by the
one configuration change: its WSGI application is
``image_cache_wasm.glance.wsgi:application`` instead of Glance's
``glance.wsgi.api:application``.

    python glance_wsgi_smoke.py WORKDIR [sqlite|xattr] [image_cache_wasm.glance.wsgi|glance.wsgi.api]

Writes a glance-api configuration into WORKDIR (a file store, a SQLite
database made by ``glance-manage db sync``, the image cache in
WORKDIR/cache with ``image_cache_driver`` as given, Glance's own
glance-api-paste.ini with the ``cachemanagement`` flavor), then, in a child
process with ``OS_GLANCE_CONFIG_DIR`` pointing at it (as a WSGI server
would load it), imports the application module and sends it requests: an
image is created and uploaded, downloaded twice (the cache middleware
caches it on the first download and serves the second from the cache),
and listed by the cache API (``GET /v2/cache``). Prints one JSON line of
what it saw: whether the cached file carries the host's seal
(``user.image-cache.id``, set only by image_cache_wasm when it commits an
image), the cache API's listing, the driver class of the middleware's
cache. Exits non-zero when a request fails.

Used by ``tests/test_glance_switch.py`` and ``.ci/python-package-check.sh``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


def write_config(work: Path, driver: str) -> Path:
    etc = work / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    for d in ("cache", "images", "staging", "tasks", "locks"):
        (work / d).mkdir(exist_ok=True)
    paste = Path(sys.prefix) / "etc" / "glance" / "glance-api-paste.ini"
    if not paste.is_file():
        raise SystemExit(f"Glance's glance-api-paste.ini is not at {paste}: is Glance installed in this environment?")
    (etc / "glance-api-paste.ini").write_text(paste.read_text())
    # No keystone here: the no-auth pipeline's context has no roles, so the
    # policy lets it do everything (a test deployment's policy).
    from glance.policies import list_rules

    (etc / "policy.yaml").write_text("".join(f'"{r.name}": ""\n' for r in list_rules()))
    (etc / "glance-api.conf").write_text(textwrap.dedent(f"""\
        [DEFAULT]
        enabled_backends = local:file
        image_cache_dir = {work / 'cache'}
        image_cache_driver = {driver}
        worker_self_reference_url = http://127.0.0.1:9292
        log_file = {work / 'glance-api.log'}

        [glance_store]
        default_backend = local

        [local]
        filesystem_store_datadir = {work / 'images'}

        [os_glance_staging_store]
        filesystem_store_datadir = {work / 'staging'}

        [os_glance_tasks_store]
        filesystem_store_datadir = {work / 'tasks'}

        [database]
        connection = sqlite:///{work / 'glance.sqlite'}

        [oslo_concurrency]
        lock_path = {work / 'locks'}

        [oslo_policy]
        policy_file = {etc / 'policy.yaml'}

        [paste_deploy]
        flavor = cachemanagement
        config_file = {etc / 'glance-api-paste.ini'}
        """))
    return etc


SERVE = r"""
import importlib, json, os, sys

module = sys.argv[1]
application = importlib.import_module(module).application

import webob

def call(method, path, body=None, json_body=None, headers=None):
    req = webob.Request.blank(path, method=method)
    if json_body is not None:
        req.body = json.dumps(json_body).encode()
        req.content_type = "application/json"
    elif body is not None:
        req.body = body
        req.content_type = "application/octet-stream"
    for k, v in (headers or {}).items():
        req.headers[k] = v
    resp = req.get_response(application)
    data = b"".join(resp.app_iter)  # the cache middleware caches as the body flows
    if hasattr(resp.app_iter, "close"):
        resp.app_iter.close()
    return resp.status_int, data

status, body = call("POST", "/v2/images", json_body={"name": "smoke", "disk_format": "raw", "container_format": "bare"})
assert status == 201, (status, body)
image_id = json.loads(body)["id"]
payload = b"an image served through glance-api\n" * 4096
status, body = call("PUT", f"/v2/images/{image_id}/file", body=payload)
assert status == 204, (status, body)
for _ in range(2):
    status, body = call("GET", f"/v2/images/{image_id}/file")
    assert status == 200 and body == payload, (status, len(body))
status, body = call("GET", "/v2/cache")
assert status == 200, (status, body)
listing = json.loads(body)

from glance.api.middleware import cache as cache_middleware
import gc
drivers = sorted({f"{type(o.cache.driver).__module__}.{type(o.cache.driver).__qualname__}"
                  for o in gc.get_objects() if isinstance(o, cache_middleware.CacheFilter)})
path = os.path.join(os.environ["SMOKE_CACHE_DIR"], image_id)
try:
    seal = os.getxattr(path, "user.image-cache.id").decode()
except OSError:
    seal = None
print(json.dumps({"image_id": image_id, "cached_file": os.path.isfile(path), "seal": seal,
                  "cached_images": [(i["image_id"], i["hits"], i["size"]) for i in listing["cached_images"]],
                  "drivers": drivers}))
"""


def main(argv) -> int:
    work = Path(argv[1]).resolve()
    driver = argv[2] if len(argv) > 2 else "sqlite"
    module = argv[3] if len(argv) > 3 else "image_cache_wasm.glance.wsgi"
    etc = write_config(work, driver)
    env = dict(os.environ, OS_GLANCE_CONFIG_DIR=str(etc), SMOKE_CACHE_DIR=str(work / "cache"))
    sync = subprocess.run(
        [sys.executable, "-c", "import sys; from glance.cmd.manage import main; sys.argv[0] = 'glance-manage'; sys.exit(main())",
         "--config-dir", str(etc), "db", "sync"],
        env=env, capture_output=True, text=True, cwd=work,
    )
    if sync.returncode != 0:
        print(sync.stdout[-4000:], sync.stderr[-4000:], file=sys.stderr)
        return 1
    serve = subprocess.run([sys.executable, "-W", "ignore", "-c", SERVE, module], env=env, cwd=work,
                           capture_output=True, text=True)
    if serve.returncode != 0:
        print(serve.stdout[-4000:], serve.stderr[-8000:], file=sys.stderr)
        log = work / "glance-api.log"
        if log.is_file():
            print(log.read_text()[-8000:], file=sys.stderr)
        return 1
    print(serve.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
