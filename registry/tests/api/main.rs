//! Registry API tests: one binary, a real server per test (port 0), over SQLite and
//! PostgreSQL, a local directory and an S3-compatible server.

mod helpers;

mod auth;
mod canary;
mod download;
mod faults;
mod ops;
mod push;
mod records;
mod rollouts;
mod runs;
mod suites;
mod validation;
mod webhooks;

/// One test per backend for `async fn NAME(Db, Blobs)`: `NAME::sqlite_local`, `NAME::postgres_local`
/// and, with `s3`, `NAME::sqlite_s3` and `NAME::postgres_s3`.
#[macro_export]
macro_rules! backends {
    ($name:ident) => {
        mod $name {
            use $crate::helpers::{Blobs, Db};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_local() {
                super::$name(Db::Sqlite, Blobs::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_local() {
                super::$name(Db::Postgres, Blobs::Local).await
            }
        }
    };
    ($name:ident, s3) => {
        mod $name {
            use $crate::helpers::{Blobs, Db};
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_local() {
                super::$name(Db::Sqlite, Blobs::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_local() {
                super::$name(Db::Postgres, Blobs::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_s3() {
                super::$name(Db::Sqlite, Blobs::S3).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_s3() {
                super::$name(Db::Postgres, Blobs::S3).await
            }
        }
    };
}
