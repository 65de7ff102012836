//! HTTP routes under `/api/v1`, one module per resource, plus health and metrics.

pub mod adapters;
pub mod base_models;
pub mod evidence;
pub mod files;
pub mod gates;
pub mod health;
pub mod me;
pub mod push;
pub mod retention;
pub mod rollouts;
pub mod routing;
pub mod runs;
pub mod suites;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .service(
            web::scope("/api/v1")
                .route("/me", web::get().to(me::me))
                .route("/base-models", web::get().to(base_models::list))
                .route("/base-models", web::post().to(base_models::create))
                .route(
                    "/base-models/{name}/evidence",
                    web::get().to(evidence::list_base),
                )
                .route(
                    "/base-models/{name}/evidence",
                    web::post().to(evidence::create_base),
                )
                .route("/adapters", web::get().to(adapters::list))
                .route("/adapters/{name}", web::get().to(adapters::show))
                .route(
                    "/adapters/{name}/versions",
                    web::get().to(adapters::versions),
                )
                .route("/adapters/{name}/versions", web::post().to(push::push))
                .route(
                    "/adapters/{name}/versions/{version}",
                    web::get().to(adapters::version),
                )
                .route(
                    "/adapters/{name}/versions/{version}",
                    web::delete().to(retention::delete_version),
                )
                .route(
                    "/adapters/{name}/versions/{version}/files/{file}",
                    web::get().to(files::download),
                )
                .route(
                    "/adapters/{name}/versions/{version}/evidence",
                    web::get().to(evidence::list),
                )
                .route(
                    "/adapters/{name}/versions/{version}/evidence",
                    web::post().to(evidence::create),
                )
                .route(
                    "/adapters/{name}/versions/{version}/gate-report",
                    web::get().to(gates::report),
                )
                .route("/adapters/{name}/gate", web::get().to(gates::show))
                .route("/adapters/{name}/gate", web::put().to(gates::put))
                .route("/adapters/{name}/rollouts", web::post().to(rollouts::start))
                .route(
                    "/adapters/{name}/rollouts/current",
                    web::get().to(rollouts::current),
                )
                .route(
                    "/adapters/{name}/rollouts/current/series",
                    web::get().to(rollouts::series),
                )
                .route(
                    "/adapters/{name}/rollouts/current/{action}",
                    web::post().to(rollouts::act),
                )
                .route("/rollouts", web::get().to(rollouts::list))
                .route("/runs", web::get().to(runs::list))
                .route("/runs", web::post().to(runs::create))
                .route("/runs/{id}", web::get().to(runs::show))
                .route("/runs/{id}/metrics", web::get().to(runs::metrics))
                .route("/runs/{id}/metrics", web::post().to(runs::post_metrics))
                .route("/runs/{id}/end", web::post().to(runs::end))
                .route("/suites", web::get().to(suites::list))
                .route("/suites", web::post().to(suites::create))
                .route("/suites/{name}", web::get().to(suites::latest))
                .route(
                    "/suites/{name}/versions/{version}",
                    web::get().to(suites::show),
                )
                .route(
                    "/suites/{name}/versions/{version}/cases",
                    web::get().to(suites::cases),
                )
                .route("/routing", web::get().to(routing::table))
                .route("/routing/observations", web::post().to(routing::observe)),
        );
}
