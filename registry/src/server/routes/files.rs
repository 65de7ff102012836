//! `GET …/versions/{v}/files/{file}`: stream a version file from object storage, with
//! `ETag` = its sha256, `If-None-Match`, and single-range `Range` requests.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, GetResult, GetResultPayload, ObjectStore};
use tokio::io::AsyncReadExt;

use crate::server::AppState;
use crate::server::caller::Caller;
use crate::server::error::ApiError;
use crate::server::records;
use crate::server::routes::adapters::path_version;

/// A `Range` header that no byte of the file satisfies (416).
#[derive(Debug, PartialEq)]
pub struct Unsatisfiable;

/// Parse `bytes=a-b`, `bytes=a-` or `bytes=-n` against a file of `len` bytes into an
/// inclusive range. `Ok(None)`: no usable single range (serve the whole file); `Err`: 416.
pub fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 || len == 0 {
                return Err(Unsatisfiable);
            }
            (len.saturating_sub(n), len - 1)
        }
        (s, "") => (s.parse().map_err(|_| Unsatisfiable)?, len.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (
                s.parse().map_err(|_| Unsatisfiable)?,
                e.parse().map_err(|_| Unsatisfiable)?,
            );
            if e < s {
                return Err(Unsatisfiable);
            }
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if start >= len {
        return Err(Unsatisfiable);
    }
    Ok(Some((start, end)))
}

/// The object's bytes as a response body. A local file is read in 1 MiB chunks: the store's
/// own stream reads 8 KiB per blocking call, which caps downloads far below disk speed.
fn stream_body(
    got: GetResult,
) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, ApiError> {
    let range = got.range.clone();
    Ok(match got.payload {
        GetResultPayload::File(mut file, path) => {
            use std::io::Seek;
            file.seek(std::io::SeekFrom::Start(range.start))
                .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
            let reader = tokio::fs::File::from_std(file).take(range.end - range.start);
            tokio_util::io::ReaderStream::with_capacity(reader, 1 << 20).boxed()
        }
        GetResultPayload::Stream(s) => s.map_err(std::io::Error::other).boxed(),
    })
}

#[utoipa::path(get, path = "/api/v1/adapters/{name}/versions/{version}/files/{file}", params(("name" = String, Path, description = "adapter, base model or suite name"), ("version" = String, Path, description = "version"), ("file" = String, Path, description = "file name")),
    responses((status = 200, description = "The file"), (status = 206, description = "A byte range"),
        (status = 304, description = "Not modified"), (status = 404, body = crate::api::ErrorBody),
        (status = 416, body = crate::api::ErrorBody)))]
pub async fn download(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (name, version, file) = path.into_inner();
    let (name, version) = path_version(&(name, version))?;
    caller.require_serving_read(&state, Some(name.as_str()))?;
    let a = records::adapter_by_name(&state.db, name.as_str()).await?;
    let v = records::version_row(&state.db, &a, version).await?;
    let f = records::files_of(&state.db, v.id)
        .await?
        .into_iter()
        .find(|f| f.name == file)
        .ok_or_else(|| ApiError::not_found(format!("{name}@{version} has no file {file:?}")))?;
    let etag = format!("\"{}\"", f.sha256);
    if let Some(inm) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && inm.split(',').any(|t| t.trim() == etag || t.trim() == "*")
    {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .finish());
    }
    let len = f.size as u64;
    let range = match req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(r) => parse_range(r, len).map_err(|_| {
            ApiError::new(
                actix_web::http::StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("range {r:?} does not fit a file of {len} bytes"),
            )
        })?,
    };
    let opts = GetOptions {
        range: range.map(|(s, e)| GetRange::Bounded(s..e + 1)),
        ..Default::default()
    };
    let got = state
        .store
        .get_opts(&object_store::path::Path::from(f.blob_key.as_str()), opts)
        .await?;
    let body = stream_body(got)?;
    let mut res = match range {
        Some((s, e)) => {
            let mut r = HttpResponse::PartialContent();
            r.insert_header((header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}")));
            r.no_chunking(e + 1 - s);
            r
        }
        None => {
            let mut r = HttpResponse::Ok();
            r.no_chunking(len);
            r
        }
    };
    Ok(res
        .insert_header((header::ETAG, etag))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header(("x-loraops-sha256", f.sha256))
        .content_type("application/octet-stream")
        .streaming(body))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Ok(Some((95, 99))));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert!(parse_range("bytes=100-", 100).is_err());
        assert!(parse_range("bytes=5-1", 100).is_err());
        assert!(parse_range("bytes=x-1", 100).is_err());
    }
}
