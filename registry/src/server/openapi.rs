//! `/openapi.json`, generated from the handlers' annotations and the wire types.

use actix_web::HttpResponse;
use utoipa::OpenApi;

use super::routes;
use crate::api;
use crate::peft;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "loraops registry",
        description = "Versioned LoRA adapters, evidence, gates and rollouts"
    ),
    paths(
        routes::health::readyz,
        routes::base_models::create,
        routes::base_models::list,
        routes::adapters::list,
        routes::adapters::show,
        routes::adapters::versions,
        routes::adapters::version,
        routes::push::push,
        routes::files::download,
        routes::evidence::create,
        routes::evidence::list,
        routes::evidence::create_base,
        routes::evidence::list_base,
        routes::gates::put,
        routes::gates::show,
        routes::rollouts::start,
        routes::rollouts::current,
        routes::rollouts::act,
        routes::routing::table,
        routes::routing::observe,
        routes::suites::create,
        routes::suites::list,
        routes::suites::latest,
        routes::suites::show,
        routes::suites::cases,
    ),
    components(schemas(
        api::ErrorBody,
        api::ErrorDetail,
        api::BaseModel,
        api::NewBaseModel,
        api::Adapter,
        api::AdapterVersion,
        api::VersionFile,
        api::PushResponse,
        api::Evidence,
        api::NewEvidence,
        api::SuiteRef,
        api::EngineIdentity,
        api::Gate,
        api::GatePolicy,
        api::GateRule,
        api::Baseline,
        api::BaseEvidence,
        api::Comparison,
        api::RoutingTable,
        api::AdapterRoute,
        api::RoutedVersion,
        api::Readiness,
        api::Rollout,
        api::RolloutSpec,
        api::RolloutState,
        api::AnalysisRule,
        api::Relation,
        api::TimeoutPolicy,
        api::ShadowSpec,
        api::RuleResult,
        api::Observations,
        api::ArmObservation,
        api::StartRollout,
        api::RolloutStatus,
        api::RolloutEvent,
        api::GateReport,
        api::RuleOutcome,
        api::ArmMetrics,
        api::TrainingManifest,
        api::DatasetRef,
        api::Role,
        api::SuiteManifest,
        api::SuiteThreshold,
        api::NewSuite,
        api::Suite,
        api::SuitePushResponse,
        peft::ModelDims,
        peft::AdapterSummary,
    ))
)]
pub struct ApiDoc;

pub async fn serve() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
