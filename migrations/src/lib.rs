//! The registry's schema. It is defined here and nowhere else: `loraops registry migrate`
//! and the registry's start-up apply these migrations in order.

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_initial;
mod m20261128_000002_suites;
mod m20261128_000003_webhooks;
mod m20261128_000004_judge_scores;
mod m20261210_000001_rollout_analysis;
mod m20261211_000001_training_runs;

pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_initial::Migration),
            Box::new(m20261128_000002_suites::Migration),
            Box::new(m20261128_000003_webhooks::Migration),
            Box::new(m20261128_000004_judge_scores::Migration),
            Box::new(m20261210_000001_rollout_analysis::Migration),
            Box::new(m20261211_000001_training_runs::Migration),
        ]
    }
}
