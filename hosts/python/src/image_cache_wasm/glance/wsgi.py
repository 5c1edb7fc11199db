"""glance-api's WSGI application with Glance's image cache on the driver
components: Glance's own ``glance.wsgi.api:application``, made after
:func:`image_cache_wasm.glance.install`.

Pointing the WSGI server at this module instead of Glance's is the one
configuration change that switches a glance-api onto the components; the
driver is still the one Glance's ``image_cache_driver`` names (``sqlite``,
``xattr``, ``centralized_db``), now run sandboxed. For uWSGI::

    [uwsgi]
    module = image_cache_wasm.glance.wsgi:application    # was glance.wsgi.api:application

(gunicorn: ``gunicorn image_cache_wasm.glance.wsgi:application``;
mod_wsgi: ``WSGIScriptAlias`` to this file, ``python -c 'import
image_cache_wasm.glance.wsgi as w; print(w.__file__)'``). Pointing it back
at ``glance.wsgi.api:application`` switches back.
"""

from image_cache_wasm.glance import install

install()

from glance.wsgi.api import application  # noqa: E402  (after the switch)

__all__ = ["application"]
