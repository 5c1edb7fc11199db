//! Glance's image records: `GET /v2/images/{id}` and `GET /v2/images`.
//!
//! python-openstackclient and openstacksdk look an image up by id (then by
//! name) before every per-image call: `openstack cached image queue` and
//! `delete`, `openstack image save`, the SDK's `download_image` (which
//! also takes the checksum to verify from the record).
//!
//! - With a **Glance** upstream the request goes to it with the token
//!   chosen as for a download ([`upstream_token`]), and Glance's status
//!   and JSON body come back as they are: Glance's authorization applies.
//!   A request without any `X-Auth-Token` is 401 here, as Glance behind
//!   keystonemiddleware answers. Redirects are not followed (502).
//! - With a **directory** upstream, or none, the server answers a minimal
//!   record of its own for an image it has cached or the directory holds
//!   (a regular file, never through a symlink), with the download's
//!   authorization; the name is the id.
//!
//! [`require_upstream_image`] is the check `PUT /v2/cache/{id}` makes
//! before queuing: Glance answers 404 for an image it does not have, and
//! a queued image the upstream lacks would stay queued forever.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use image_cache::{Algorithm, Checksum, Error};
use reqwest::Url;
use serde_json::{Value, json};
use tracing::warn;

use super::access::upstream_token;
use super::upstream::Upstream;
use super::{ApiError, App, RawId, auth, validate_id};

/// Largest answer read from Glance for a record or a list.
const MAX_UPSTREAM_BYTES: usize = 8 << 20;
/// Glance's `limit_param_default` and `api_limit_max`.
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 1000;

/// `GET /v2/images/{id}`
pub async fn get_image(
    State(app): State<Arc<App>>,
    RawId(id): RawId,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    validate_id(&id)?;
    if let Some(Upstream::Glance(g)) = app.upstream.as_ref() {
        let url = format!("{}/v2/images/{}", g.base, super::upstream::url_segment(&id));
        let url = Url::parse(&url).map_err(|e| ApiError::internal(format!("URL {url}: {e}")))?;
        return proxy(&app, &g.client, url, &headers).await;
    }
    app.tokens.check_download(&headers)?;
    match local_record(&app, &id).await? {
        Some(record) => Ok(json_response(StatusCode::OK, record)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("No image found with ID {id}"),
        )),
    }
}

/// `GET /v2/images`: `name=` finds the image of that id; without it, the
/// cached images (`limit`, `marker`); other filters are ignored.
pub async fn list_images(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(Upstream::Glance(g)) = app.upstream.as_ref() {
        let url = format!("{}/v2/images", g.base);
        let mut url =
            Url::parse(&url).map_err(|e| ApiError::internal(format!("URL {url}: {e}")))?;
        if let Some(q) = query.as_deref().filter(|q| !q.is_empty()) {
            url.set_query(Some(q));
        }
        return proxy(&app, &g.client, url, &headers).await;
    }
    app.tokens.check_download(&headers)?;
    let params = query_pairs(query.as_deref().unwrap_or(""));
    let param = |key: &str| {
        params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let limit = match param("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v.trim().parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "limit param must be a non-negative integer",
            )
        })?,
    }
    .min(MAX_LIMIT);
    let hidden = param("os_hidden").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let mut document = json!({
        "images": [],
        "schema": "/v2/schemas/images",
        "first": "/v2/images",
    });
    // Every image here is visible: a search of hidden ones finds none.
    if hidden || limit == 0 {
        return Ok(json_response(StatusCode::OK, document));
    }
    if let Some(name) = param("name") {
        // The name is the id; a name that cannot be an id matches nothing.
        if validate_id(name).is_ok()
            && param("marker").is_none_or(|m| m < name)
            && let Some(record) = local_record(&app, name).await?
        {
            document["images"] = json!([record]);
        }
        return Ok(json_response(StatusCode::OK, document));
    }
    let app2 = app.clone();
    let cached = tokio::task::spawn_blocking(move || app2.cache.get_cached_images())
        .await
        .map_err(|e| ApiError::internal(format!("list task: {e}")))?
        .map_err(|e| app.library_error(e, "list"))?;
    let mut cached: Vec<_> = cached
        .into_iter()
        .filter(|i| validate_id(&i.image_id).is_ok())
        .filter(|i| param("marker").is_none_or(|m| i.image_id.as_str() > m))
        .collect();
    cached.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    let more = cached.len() > limit;
    cached.truncate(limit);
    let images: Vec<Value> = cached
        .iter()
        .map(|i| record(&i.image_id, Some(i.size), Some(i.last_modified), None))
        .collect();
    if more && let Some(last) = cached.last() {
        document["next"] = json!(format!(
            "/v2/images?limit={limit}&marker={}",
            super::upstream::url_segment(&last.image_id)
        ));
    }
    document["images"] = Value::Array(images);
    Ok(json_response(StatusCode::OK, document))
}

/// Before queuing `id` (validated): the upstream must have it (404 if
/// not, 502 if it cannot say); with no upstream, it must be cached
/// already (queuing it is then a no-op).
pub async fn require_upstream_image(
    app: &Arc<App>,
    id: &str,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let Some(upstream) = app.upstream.as_ref() else {
        let app2 = app.clone();
        let id2 = id.to_string();
        let cached = tokio::task::spawn_blocking(move || app2.cache.is_cached(&id2))
            .await
            .map_err(|e| ApiError::internal(format!("is-cached task: {e}")))?
            .map_err(|e| app.library_error(e, "is-cached"))?;
        return match cached {
            true => Ok(()),
            false => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("image {id} is not cached and no upstream is configured"),
            )),
        };
    };
    let token = upstream_token(app, headers);
    match upstream.has(id, token.as_deref()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("image {id} not found upstream"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Send `url` to Glance with the client's token (as a download would
/// pass it) and answer what Glance answered.
async fn proxy(
    app: &App,
    client: &reqwest::Client,
    url: Url,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if headers.get(auth::TOKEN_HEADER).is_none() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this endpoint requires a token in the X-Auth-Token header",
        ));
    }
    // With --image-token-file the upstream token stands in for the
    // client's: only a client allowed to download may use it.
    app.tokens.check_download(headers)?;
    let token = upstream_token(app, headers);
    let mut request = client
        .get(url.clone())
        .header(header::ACCEPT, "application/json");
    if let Some(token) = token {
        request = request.header(auth::TOKEN_HEADER, token);
    }
    let gateway = |message: String| ApiError::new(StatusCode::BAD_GATEWAY, message);
    let mut response = request.send().await.map_err(|e| {
        warn!(path = url.path(), error = %e, "upstream request failed");
        gateway("the upstream did not answer".into())
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_UPSTREAM_BYTES {
                    return Err(gateway(format!(
                        "the upstream's answer is larger than {MAX_UPSTREAM_BYTES} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                warn!(path = url.path(), error = %e, "reading the upstream's answer failed");
                return Err(gateway("the upstream's answer was cut".into()));
            }
        }
    }
    if (300..400).contains(&status) {
        return Err(gateway(format!(
            "the upstream answered a redirect ({status}), which is not followed"
        )));
    }
    let status = StatusCode::from_u16(status)
        .map_err(|_| gateway(format!("the upstream answered status {status}")))?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
        let mut r = (status, Bytes::from(body)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return Ok(r);
    }
    if status.is_success() {
        return Err(gateway(
            "the upstream's answer is not JSON; is it a Glance API?".into(),
        ));
    }
    Err(ApiError::new(
        status,
        format!("the upstream answered {}", status.as_u16()),
    ))
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// The record of an image this server has: cached, else a regular file
/// of the directory upstream.
async fn local_record(app: &Arc<App>, id: &str) -> Result<Option<Value>, ApiError> {
    let app2 = app.clone();
    let id2 = id.to_string();
    // A read session dropped unfinished counts no hit: the file's size
    // and time, and the checksum recorded when it was cached.
    let cached = tokio::task::spawn_blocking(move || -> image_cache::Result<_> {
        let mut reader = match app2.cache.open_for_read(&id2) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = reader
            .file()
            .map(|f| f.metadata())
            .transpose()
            .map_err(|e| Error::io("reading cached image", &e))?;
        let checksum = reader.checksum().unwrap_or_else(|e| {
            app2.note_driver_error(&e, "checksum");
            None
        });
        Ok(Some((
            meta.as_ref().map(|m| m.len()),
            meta.and_then(|m| m.modified().ok()).map(unix_seconds),
            checksum,
        )))
    })
    .await
    .map_err(|e| ApiError::internal(format!("record task: {e}")))?;
    match cached {
        Ok(Some((size, time, checksum))) => {
            return Ok(Some(record(id, size, time, checksum.as_deref())));
        }
        Ok(None) => {}
        Err(e) => return Err(app.library_error(e, "open-for-read")),
    }
    let Some(Upstream::Dir(dir)) = app.upstream.as_ref() else {
        return Ok(None);
    };
    let path = dir.join(id);
    let meta = tokio::task::spawn_blocking(move || regular_file(&path))
        .await
        .map_err(|e| ApiError::internal(format!("record task: {e}")))?;
    Ok(meta.map(|m| record(id, Some(m.len()), m.modified().ok().map(unix_seconds), None)))
}

/// `path`'s metadata if it is a regular file itself (not a symlink to one).
fn regular_file(path: &Path) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix seconds as Glance writes times, `2025-01-31T12:34:56Z`.
fn iso_utc(seconds: f64) -> String {
    jiff::Timestamp::from_second(seconds.floor() as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// A minimal Glance image record: the fields openstacksdk's `Image` and
/// openstackclient read, the name being the id.
fn record(id: &str, size: Option<u64>, time: Option<f64>, checksum: Option<&str>) -> Value {
    let time = iso_utc(time.unwrap_or_else(|| unix_seconds(SystemTime::now())));
    let (mut md5, mut algo, mut value) = (None, None, None);
    if let Some(c) = checksum.and_then(|c| c.parse::<Checksum>().ok()) {
        match c.algorithm {
            Algorithm::Md5 => md5 = Some(c.hex),
            other => {
                algo = Some(other.name());
                value = Some(c.hex);
            }
        }
    }
    let segment = super::upstream::url_segment(id);
    json!({
        "id": id,
        "name": id,
        "status": "active",
        "visibility": "private",
        "protected": false,
        "os_hidden": false,
        "disk_format": "raw",
        "container_format": "bare",
        "size": size,
        "virtual_size": null,
        "checksum": md5,
        "os_hash_algo": algo,
        "os_hash_value": value,
        "owner": null,
        "min_disk": 0,
        "min_ram": 0,
        "tags": [],
        "created_at": time,
        "updated_at": time,
        "file": format!("/v2/images/{segment}/file"),
        "self": format!("/v2/images/{segment}"),
        "schema": "/v2/schemas/image",
    })
}

/// A query string's decoded `key=value` pairs.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let Ok(mut url) = Url::parse("http://query.invalid/") else {
        return Vec::new();
    };
    url.set_query(Some(query));
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_the_checksum_glance_would() {
        let md5 = "md5:0123456789abcdef0123456789abcdef";
        let r = record("a b", Some(3), Some(0.0), Some(md5));
        assert_eq!(r["checksum"], "0123456789abcdef0123456789abcdef");
        assert_eq!(r["os_hash_algo"], Value::Null);
        assert_eq!(r["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(r["file"], "/v2/images/a%20b/file");
        let sha = format!("sha256:{}", "ab".repeat(32));
        let r = record("x", None, None, Some(&sha));
        assert_eq!(r["checksum"], Value::Null);
        assert_eq!(r["os_hash_algo"], "sha256");
        assert_eq!(r["os_hash_value"], "ab".repeat(32));
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_pairs("name=a%2Fb&limit=5&x"),
            [
                ("name".to_string(), "a/b".to_string()),
                ("limit".to_string(), "5".to_string()),
                ("x".to_string(), String::new()),
            ]
        );
    }
}
