//! The registry service: `Application::build` wires settings into a running actix-web server
//! (database migrated, object store opened, auth keys loaded, orphan sweep and rollout
//! controller and webhook delivery started).
//!
//! A request walks: `routes/*` (handler: parse, authorise) → `records.rs` / `blobs.rs`
//! (persistence) → `error.rs` (the JSON error shape).

pub mod blobs;
pub mod caller;
pub mod entities;
pub mod error;
pub mod gate;
pub mod metrics;
mod openapi;
pub mod records;
pub mod rollouts;
pub mod routes;
pub mod settings;
pub mod supervisor;
pub mod sweep;
pub mod ui;
pub mod webhooks;

use std::net::TcpListener;
use std::time::Duration;

use actix_web::{App, HttpServer, dev::Server, middleware, web};
use loraops_migrations::MigratorTrait;
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

use crate::auth::{AuthError, Verifier};
use blobs::Store;
use metrics::Metrics;
pub use settings::{RegistrySettings, S3Settings, ServeSettings};

/// Shared by every handler.
pub struct AppState {
    pub db: DatabaseConnection,
    pub store: Store,
    pub verifier: Verifier,
    pub metrics: Metrics,
    pub webhooks: webhooks::Webhooks,
    pub settings: ServeSettings,
    /// Heartbeats of the background loops (controller, webhooks, sweep).
    pub supervisor: std::sync::Arc<supervisor::Supervisor>,
    /// The routing revision as this replica's long-polls see it.
    pub routing: routes::routing::RoutingWatch,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database {url}: {source}")]
    Database { url: String, source: sea_orm::DbErr },
    #[error(transparent)]
    Store(#[from] blobs::StoreConfigError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Webhooks(#[from] webhooks::WebhookConfigError),
    #[error("[registry] {0}")]
    Settings(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// Connect to the configured database and apply pending migrations.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, StartError> {
    let err = |source| StartError::Database {
        url: redact(url),
        source,
    };
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .map(|p| p.split('?').next().unwrap_or(p))
        && let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| err(sea_orm::DbErr::Custom(e.to_string())))?;
    }
    let mut opts = ConnectOptions::new(url.to_string());
    opts.max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    // SQLite: WAL so readers never block the writer; wait on a busy database instead of failing.
    opts.map_sqlx_sqlite_opts(|o| {
        o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
    });
    let db = Database::connect(opts).await.map_err(err)?;
    loraops_migrations::Migrator::up(&db, None)
        .await
        .map_err(err)?;
    Ok(db)
}

/// Hide the password of a database URL in messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***{}", &url[..s], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl AppState {
    pub async fn new(settings: ServeSettings) -> Result<Self, StartError> {
        settings.registry.validate().map_err(StartError::Settings)?;
        let webhooks = webhooks::Webhooks::from_settings(&settings.registry.webhooks)?;
        let url = settings.registry.database_url(&settings.data_dir);
        let db = connect_and_migrate(&url, settings.registry.max_db_connections).await?;
        let store = blobs::open(
            &settings.registry.object_store_url(&settings.data_dir),
            &settings.s3,
        )?;
        let verifier = Verifier::from_settings(&settings.auth, &settings.data_dir, true)?;
        let metrics = Metrics::new();
        let supervisor = std::sync::Arc::new(supervisor::Supervisor::new(&metrics.registry));
        Ok(Self {
            db,
            store,
            verifier,
            metrics,
            webhooks,
            routing: routes::routing::RoutingWatch::new(
                settings.registry.max_routing_waiters_per_caller,
            ),
            settings,
            supervisor,
        })
    }
}

/// Mount the registry's routes and their JSON/path/query error handlers.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(4 << 20)
            .error_handler(|e, _| error::extractor_error(e)),
    )
    .app_data(web::PathConfig::default().error_handler(|e, _| error::extractor_error(e)))
    .app_data(web::QueryConfig::default().error_handler(|e, _| error::extractor_error(e)))
    .configure(routes::configure)
    .configure(ui::configure)
    .route("/openapi.json", web::get().to(openapi::serve));
}

/// A registry server bound to its port, ready to run.
pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    controller: tokio::task::JoinHandle<()>,
    webhooks: Option<tokio::task::JoinHandle<()>>,
    sweep: tokio::task::JoinHandle<()>,
    routing_watch: tokio::task::JoinHandle<()>,
}

impl Application {
    pub async fn build(settings: ServeSettings) -> Result<Self, StartError> {
        let listen = settings.registry.listen.clone();
        let state = web::Data::new(AppState::new(settings).await?);
        let listener = TcpListener::bind(&listen).map_err(|source| StartError::Listen {
            addr: listen.clone(),
            source,
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: listen.clone(),
                source,
            })?
            .port();
        let data = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .wrap(middleware::from_fn(metrics::observe))
                .wrap(tracing_actix())
                .configure(configure)
                .default_service(web::to(no_route))
        })
        .listen(listener)
        .map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?
        .run();
        let sweep = sweep::spawn_periodic(state.clone());
        let controller = rollouts::spawn(state.clone());
        let watch = state.clone();
        let routing_watch = state.supervisor.spawn(
            "routing_watch",
            std::time::Duration::from_secs(60),
            move || {
                let state = watch.clone();
                async move {
                    state
                        .routing
                        .watch_once(&state.db)
                        .await
                        .map(supervisor::Pass::Sleep)
                }
            },
        );
        let webhooks = webhooks::spawn(state.clone());
        Ok(Self {
            port,
            server,
            state,
            controller,
            webhooks,
            sweep,
            routing_watch,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server gracefully (`handle.stop(true)`).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serves until stopped; the rollout controller and webhook delivery stop with the
    /// server, so a stopped registry leaves running rollouts and pending deliveries to the next
    /// one (their state is in the database).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let res = self.server.await;
        self.controller.abort();
        self.sweep.abort();
        self.routing_watch.abort();
        if let Some(w) = self.webhooks {
            w.abort();
        }
        res
    }
}

/// Unknown paths answer in the API's error shape too.
pub async fn no_route(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    error::ApiError::not_found(format!("no route for {} {}", req.method(), req.path()))
        .error_response()
}

fn tracing_actix() -> middleware::Logger {
    middleware::Logger::new("%r %s %b %Dms").log_target("loraops::registry::http")
}
