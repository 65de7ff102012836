//! The web console at `/ui`: static assets embedded in the binary (an air-gapped cluster has no
//! CDN), rendered in the browser from the same `/api/v1` every other client uses, so the
//! console can never show or do more than the caller's token allows.
//!
//! `LORAOPS_UI_DIR` serves the files from that directory instead, for working on the console
//! without rebuilding.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

use crate::server::error::ApiError;

/// (path under `/ui/`, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/app.css"),
    ),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.iife.min.js"),
    ),
    (
        "vendor/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/vendor/uPlot.min.css"),
    ),
];

/// Scripts and styles from this origin only; the API is same-origin too.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/ui",
        web::get().to(|| async {
            HttpResponse::PermanentRedirect()
                .insert_header((header::LOCATION, "/ui/"))
                .finish()
        }),
    )
    .route("/ui/", web::get().to(index))
    .route("/ui/{path:.*}", web::get().to(asset));
}

async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, "index.html")
}

async fn asset(req: HttpRequest, path: web::Path<String>) -> HttpResponse {
    serve(&req, &path)
}

fn serve(req: &HttpRequest, path: &str) -> HttpResponse {
    let Some(&(name, mime, embedded)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return ApiError::not_found(format!("no console file {path:?}")).error_response();
    };
    let bytes = match std::env::var_os("LORAOPS_UI_DIR") {
        Some(dir) => match std::fs::read(std::path::Path::new(&dir).join(name)) {
            Ok(b) => b,
            Err(e) => {
                return ApiError::internal(format!("LORAOPS_UI_DIR: reading {name}: {e}"))
                    .error_response();
            }
        },
        None => embedded.to_vec(),
    };
    let etag = format!(
        "\"{}\"",
        &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))[..32]
    );
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return HttpResponse::NotModified()
            .insert_header((header::ETAG, etag))
            .finish();
    }
    HttpResponse::Ok()
        .content_type(mime)
        .insert_header((header::ETAG, etag))
        // Revalidated on every load: a new binary's console is picked up at once.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(bytes)
}
