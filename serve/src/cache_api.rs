//! Glance's cache management API (`glance/api/v2/cached_images.py`, image
//! API v2.14 and v2.18), the versions document python-glanceclient checks
//! before any cache call, and the driver swap endpoint.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use image_cache::DriverSource;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{ApiError, App, RawId, auth, background, validate_id};

/// Newest image API version this server implements (cache clean/prune).
const CURRENT: u32 = 18;

/// The management API takes the admin token: 401 for a missing or
/// unknown token, 403 for the image token (valid here, but not for this).
pub(crate) fn admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    match app.tokens.admin.as_ref() {
        Some(token) => {
            auth::check(headers, &[token]).map_err(|e| match app.tokens.image.as_ref() {
                Some(image) if auth::check(headers, &[image]).is_ok() => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "the image token does not grant the cache management API",
                ),
                _ => e,
            })
        }
        None => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the cache management API is disabled: the server has no admin token \
             (--admin-token-file or IMAGE_CACHE_ADMIN_TOKEN)",
        )),
    }
}

/// Run a blocking library call on the blocking pool.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    what: &'static str,
    f: impl FnOnce(&App) -> image_cache::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    let app2 = app.clone();
    // Hits and access times must include every download counted so far.
    match tokio::task::spawn_blocking(move || {
        app2.hits.flush();
        f(&app2)
    })
    .await
    {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(app.library_error(e, what)),
        Err(e) => Err(ApiError::internal(format!("{what} task: {e}"))),
    }
}

/// `GET /v2/cache`
pub async fn get_cache_state(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let (cached, queued) = blocking(&app, "list", |app| {
        Ok((
            app.cache.get_cached_images()?,
            app.cache.get_queued_images()?,
        ))
    })
    .await?;
    let cached: Vec<Value> = cached
        .into_iter()
        .map(|i| {
            json!({
                "image_id": i.image_id,
                "hits": i.hits,
                "last_accessed": i.last_accessed,
                "last_modified": i.last_modified,
                "size": i.size,
            })
        })
        .collect();
    Ok(Json(
        json!({"cached_images": cached, "queued_images": queued}),
    ))
}

/// `PUT /v2/cache/{id}`: queue for the prefetcher (202); 404, as
/// Glance, for an image the upstream does not have (or, without an
/// upstream, that is not cached), which would stay queued forever.
pub async fn queue_image(
    State(app): State<Arc<App>>,
    RawId(id): RawId,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    admin(&app, &headers)?;
    validate_id(&id)?;
    super::image_records::require_upstream_image(&app, &id, &headers).await?;
    let id2 = id.clone();
    let queued = blocking(&app, "queue", move |app| app.cache.queue_image(&id2)).await?;
    info!(image_id = %id, queued, "queue request");
    if queued {
        app.prefetch_now.notify_one();
    }
    Ok(StatusCode::ACCEPTED)
}

/// `DELETE /v2/cache/{id}`: out of the cache and the queue (204); 404 if
/// it is in neither.
pub async fn delete_cache_entry(
    State(app): State<Arc<App>>,
    RawId(id): RawId,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    admin(&app, &headers)?;
    validate_id(&id)?;
    let id2 = id.clone();
    let found = blocking(&app, "delete", move |app| {
        let cached = app.cache.is_cached(&id2)?;
        let queued = app.cache.is_queued(&id2)?;
        if cached {
            app.cache.delete_cached_image(&id2)?;
        }
        if queued {
            app.cache.delete_queued_image(&id2)?;
        }
        Ok(cached || queued)
    })
    .await?;
    if !found {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Image {id} not found."),
        ));
    }
    info!(image_id = %id, "deleted from the cache and the queue");
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v2/cache` with `x-image-cache-clear-target: cache|queue|`.
pub async fn clear_cache(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    admin(&app, &headers)?;
    let target = match headers.get("x-image-cache-clear-target") {
        None => String::new(),
        Some(v) => v
            .to_str()
            .map_err(|_| bad_target())?
            .trim()
            .to_ascii_lowercase(),
    };
    let (cache, queue) = match target.as_str() {
        "" => (true, true),
        "cache" => (true, false),
        "queue" => (false, true),
        _ => return Err(bad_target()),
    };
    let (c, q) = blocking(&app, "clear", move |app| {
        let c = if cache {
            app.cache.delete_all_cached_images()?
        } else {
            0
        };
        let q = if queue {
            app.cache.delete_all_queued_images()?
        } else {
            0
        };
        Ok((c, q))
    })
    .await?;
    info!(cache_deleted = c, queue_deleted = q, "cache cleared");
    Ok(StatusCode::NO_CONTENT)
}

fn bad_target() -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "If provided 'x-image-cache-clear-target' must be 'cache', 'queue' or empty string.",
    )
}

/// `POST /v2/cache/clean`
pub async fn clean(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let report = background::clean_once(&app).await?;
    Ok(Json(report))
}

/// `POST /v2/cache/prune`
pub async fn prune(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let report = background::prune_once(&app).await?;
    Ok(Json(report))
}

/// `GET /v2/cache/nodes/{id}`: the nodes (their
/// `worker_self_reference_url`) whose caches hold the image, with the
/// centralized driver; 409, as Glance answers, when the driver keeps one
/// node's metadata only.
pub async fn cached_nodes(
    State(app): State<Arc<App>>,
    RawId(id): RawId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&app, &headers)?;
    validate_id(&id)?;
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || app2.cache.get_cached_nodes(&id))
        .await
        .map_err(|e| ApiError::internal(format!("nodes task: {e}")))?;
    match result {
        // A bare list, as Glance answers (and openstacksdk's
        // `image_nodes` reads).
        Ok(nodes) => Ok(Json(nodes).into_response()),
        Err(image_cache::Error::Unsupported(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "listing cached nodes needs the centralized driver (Glance's centralized_db); this driver keeps one node's metadata",
        )),
        Err(e) => Err(app.library_error(e, "nodes")),
    }
}

/// `GET /v2/cache/driver`
pub async fn get_driver(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let d = app.cache.driver();
    let info = d.info();
    Ok(Json(json!({
        "driver": d.name(),
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "contract": d.component().manifest().version.to_string(),
        "grants": d.component().grants().names(),
        "sha256": d.component().sha256(),
        "signature": d.component().signature(),
        "last_rollback": app.cache.last_rollback(),
        "fail_policy": app.cache.fail_policy().as_str(),
        "fail_reloads": app.cache.fail_reloads(),
    })))
}

/// `POST /v2/cache/driver/rollback`: swap back to the driver that served
/// before the last swap (kept configured); 404 if there was no swap.
pub async fn rollback_driver(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let _one = app.swap_lock.lock().await;
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || app2.cache.rollback())
        .await
        .map_err(|e| ApiError::internal(format!("rollback task: {e}")))?;
    match result {
        Ok(()) => {
            let name = app.cache.driver().name().to_string();
            tracing::warn!(driver = %name, "driver rolled back by the operator");
            Ok(Json(json!({"driver": name})))
        }
        Err(image_cache::Error::NotFound(m)) => Err(ApiError::new(StatusCode::NOT_FOUND, m)),
        Err(e) => Err(app.library_error(e, "rollback")),
    }
}

/// `POST /v2/cache/driver` with `{"driver": "sqlite" | "xattr" | PATH}`
/// (or what the server's driver resolver accepts, `oci://...` from the CLI):
/// load and configure the new driver, then swap it in; calls already
/// running finish on the old one. 400 if it cannot be used (old stays).
pub async fn swap_driver(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    admin(&app, &headers)?;
    let doc: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON like {{\"driver\": \"xattr\"}}: {e}"),
        )
    })?;
    let Some(spec) = doc.get("driver").and_then(Value::as_str) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must name the driver: {\"driver\": \"sqlite\"|\"xattr\"|\"/path/driver.wasm\"}",
        ));
    };
    let source = match app.driver_resolver.clone() {
        Some(resolver) => {
            let spec = spec.to_string();
            tokio::task::spawn_blocking(move || (resolver.0)(&spec))
                .await
                .map_err(|e| ApiError::internal(format!("driver resolver: {e}")))?
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?
        }
        None => DriverSource::named(spec)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?,
    };
    let name = super::swap(&app, source).await?;
    Ok(Json(json!({"driver": name})))
}

/// Glance's versions document: python-glanceclient looks for `v2.14`
/// (cache list/queue/delete/clear) and `v2.18` (clean/prune).
pub fn versions_document(headers: &HeaderMap) -> Value {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1:9292");
    let href = format!("http://{host}/v2/");
    let versions: Vec<Value> = (0..=CURRENT)
        .rev()
        .map(|minor| {
            json!({
                "id": format!("v2.{minor}"),
                "status": if minor == CURRENT { "CURRENT" } else { "SUPPORTED" },
                "links": [{"rel": "self", "href": href}],
            })
        })
        .collect();
    json!({ "versions": versions })
}

/// `GET /v2/schemas/image`: python-glanceclient's shell fetches it (and
/// caches it in ~/.glanceclient) before any v2 command, and falls back to
/// the v1 API, which has no cache commands, if it cannot. This server
/// serves image files, not image records; the schema describes Glance's
/// image record so the client can proceed.
pub async fn image_schema() -> Json<Value> {
    let s = |t: &str, d: &str| json!({"type": t, "readOnly": true, "description": d});
    let ns = |d: &str| json!({"type": ["null", "string"], "description": d});
    Json(json!({
        "name": "image",
        "properties": {
            "id": {"type": "string", "description": "An identifier for the image", "pattern": "^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){12}$"},
            "name": ns("Descriptive name for the image"),
            "status": {"type": "string", "readOnly": true, "description": "Status of the image",
                       "enum": ["queued", "saving", "active", "killed", "deleted", "uploading", "importing", "pending_delete", "deactivated"]},
            "visibility": {"type": "string", "description": "Scope of image accessibility",
                           "enum": ["community", "public", "private", "shared"]},
            "protected": {"type": "boolean", "description": "If true, image will not be deletable."},
            "os_hidden": {"type": "boolean", "description": "If true, image will not appear in default image list response."},
            "checksum": {"type": ["null", "string"], "readOnly": true, "maxLength": 32, "description": "md5 hash of image contents."},
            "os_hash_algo": {"type": ["null", "string"], "readOnly": true, "maxLength": 64, "description": "Algorithm to calculate the os_hash_value"},
            "os_hash_value": {"type": ["null", "string"], "readOnly": true, "maxLength": 128, "description": "Hexdigest of the image contents using the algorithm specified by the os_hash_algo"},
            "owner": ns("Owner of the image"),
            "size": {"type": ["null", "integer"], "readOnly": true, "description": "Size of image file in bytes"},
            "virtual_size": {"type": ["null", "integer"], "readOnly": true, "description": "Virtual size of image in bytes"},
            "container_format": {"type": ["null", "string"], "description": "Format of the container",
                                 "enum": [null, "ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed"]},
            "disk_format": {"type": ["null", "string"], "description": "Format of the disk",
                            "enum": [null, "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop"]},
            "created_at": {"type": "string", "readOnly": true, "description": "Date and time of image registration"},
            "updated_at": {"type": "string", "readOnly": true, "description": "Date and time of the last image modification"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 255}, "description": "List of strings related to the image"},
            "direct_url": {"type": "string", "readOnly": true, "description": "URL to access the image file kept in external store"},
            "min_ram": {"type": "integer", "description": "Amount of ram (in MB) required to boot image."},
            "min_disk": {"type": "integer", "description": "Amount of disk space (in GB) required to boot image."},
            "self": s("string", "An image self url"),
            "file": s("string", "An image file url"),
            "schema": s("string", "An image schema url"),
        },
        "additionalProperties": {"type": "string"},
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }))
}

/// `GET /versions`
pub async fn versions(headers: HeaderMap) -> Json<Value> {
    Json(versions_document(&headers))
}

/// `GET /`: Glance answers 300 Multiple Choices with the same document.
pub async fn root(headers: HeaderMap) -> Response {
    (
        StatusCode::MULTIPLE_CHOICES,
        Json(versions_document(&headers)),
    )
        .into_response()
}

pub fn log_swap_failure(spec: &str, e: &str) {
    warn!(
        driver = spec,
        error = e,
        "driver swap refused; the old driver stays"
    );
}
