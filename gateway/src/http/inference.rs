//! `POST /v1/chat/completions` and `POST /v1/completions`: authenticate, validate, route, wait
//! for a concurrency slot, then run the engine and answer as OpenAI does (JSON, or SSE chunks
//! ending in `data: [DONE]`). A deployer's `x-loraops-arm: canary` forces the rollout's
//! candidate (uncounted); a sample of stable requests in a shadow phase is mirrored afterwards.

use std::convert::Infallible;
use std::time::Instant;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use loraops_registry::api::{Name, Role};
use loraops_registry::auth::Principal;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{AppState, auth};
use crate::dispatch::dispatch;
use crate::engine::{EngineError, Event, TokenUsage};
use crate::error::ApiError;
use crate::judge;
use crate::limiter::Permit;
use crate::respond::{Choice, Kind, Shape, random_id};
use crate::routing::{Arm, RouteError, Target};
use crate::shadow;
use crate::validate::{self, Validated};

pub async fn chat_completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let principal = auth::caller(&state, &req)?;
    let body = parse(payload, state.limits.max_body_bytes).await?;
    let v = validate::chat(body, &state.limits)?;
    serve(state, req, principal, v, Kind::Chat, start).await
}

pub async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let principal = auth::caller(&state, &req)?;
    let body = parse(payload, state.limits.max_body_bytes).await?;
    let v = validate::completion(body, &state.limits)?;
    serve(state, req, principal, v, Kind::Text, start).await
}

/// Read the body up to the limit (413 beyond) and parse it (400), after auth so that an
/// unauthenticated caller learns nothing about the API.
async fn parse<T: DeserializeOwned>(
    mut payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::too_large(
                None,
                format!("the request body is larger than this gateway's limit of {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })
}

/// Header `x-loraops-user`, else the request's `user`, else the token's subject, else random.
fn sticky_key(req: &HttpRequest, user: Option<&str>, p: Option<&Principal>) -> String {
    req.headers()
        .get("x-loraops-user")
        .and_then(|h| h.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| user.map(str::to_string))
        .or_else(|| p.map(|p| p.sub.clone()))
        .unwrap_or_else(|| random_id().to_string())
}

fn route_error(e: RouteError, model: &str) -> ApiError {
    match e {
        RouteError::UnknownModel(_) => ApiError::model_not_found(model),
        RouteError::NoCanary(_) => ApiError::not_found(format!(
            "{model} has no canary or shadow candidate to force with x-loraops-arm"
        )),
        RouteError::Registry { .. } => ApiError::unavailable(e.to_string()),
    }
}

/// `x-loraops-arm: canary`: a smoke test of the rollout's candidate whatever the split.
fn forced(req: &HttpRequest) -> Result<bool, ApiError> {
    match req.headers().get("x-loraops-arm").map(|h| h.to_str()) {
        None => Ok(false),
        Some(Ok("canary")) => Ok(true),
        Some(_) => Err(ApiError::bad_request(
            "x-loraops-arm accepts only `canary` (a deployer's smoke test of the candidate)",
        )
        .with_param("x-loraops-arm")),
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Rejected(m) => ApiError::bad_request(m),
        EngineError::Overloaded(m) => ApiError::overloaded(m),
        EngineError::Load { .. } => ApiError::unavailable(e.to_string()),
        EngineError::Internal(m) => ApiError::internal(m),
    }
}

/// Metric labels of a request: adapter, version, arm.
struct Labels([String; 3]);

impl Labels {
    fn of(t: &Target) -> Self {
        let (a, v) = match (t.adapter(), &t.route) {
            (Some((a, v)), _) => (a.to_string(), v.to_string()),
            // The base model serving the stable arm of an adapter without a stable version.
            (None, Some(r)) => (r.to_string(), String::new()),
            (None, None) => (String::new(), String::new()),
        };
        Self([a, v, t.arm.as_str().to_string()])
    }

    fn refs(&self) -> [&str; 3] {
        [&self.0[0], &self.0[1], &self.0[2]]
    }
}

/// Records one request's metrics when it ends, however it ends.
struct Observer {
    state: web::Data<AppState>,
    labels: Labels,
    /// The adapter whose routing chose the target, and the arm (reported to the registry).
    route: Option<Name>,
    arm: &'static str,
    /// The sticky key: users are counted per arm.
    user: String,
    start: Instant,
    engine_start: Instant,
    first_token: Option<Instant>,
    /// Mirrored once the request has ended (shadow phase), with the answer when kept.
    shadow: Option<shadow::Job>,
    answer: Option<String>,
}

impl Observer {
    fn token(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(Instant::now());
            let l = self.labels.refs();
            self.state
                .metrics
                .ttft
                .with_label_values(&l)
                .observe(self.start.elapsed().as_secs_f64());
        }
    }

    fn finish(&mut self, status_code: u16, usage: Option<TokenUsage>) {
        let m = &self.state.metrics;
        let l = self.labels.refs();
        let total = self.start.elapsed();
        let status = status_code.to_string();
        m.requests
            .with_label_values(&[l[0], l[1], l[2], status.as_str()])
            .inc();
        m.latency.with_label_values(&l).observe(total.as_secs_f64());
        let engine = self.engine_start.elapsed();
        m.overhead
            .observe(total.saturating_sub(engine).as_secs_f64());
        // A deployer's forced requests are smoke tests, not traffic: never analysed.
        if let Some(name) = &self.route
            && self.arm != Arm::Forced.as_str()
        {
            let version = l[1].parse().unwrap_or(0);
            let tokens = usage.as_ref().map(|u| u.completion_tokens);
            self.state.recorder.record(
                name,
                version,
                self.arm,
                status_code,
                total,
                tokens,
                &self.user,
            );
        }
        if let Some(job) = self.shadow.take() {
            shadow::spawn(self.state.clone(), job, self.answer.take());
        }
        if let Some(u) = usage {
            m.tokens
                .with_label_values(&[l[0], l[1], l[2], "prompt"])
                .inc_by(u.prompt_tokens);
            m.tokens
                .with_label_values(&[l[0], l[1], l[2], "completion"])
                .inc_by(u.completion_tokens);
        }
    }
}

/// Whether the caller may pin versions outside the routing table: an evaluator or deployer
/// of that adapter (`pinned_versions = routed`).
fn may_pin_any(p: Option<&Principal>, model: &str) -> bool {
    let adapter = model.split('@').next().unwrap_or(model);
    p.is_some_and(|p| (p.has(Role::Evaluator) || p.has(Role::Deployer)) && p.may_touch(adapter))
}

async fn serve(
    state: web::Data<AppState>,
    req: HttpRequest,
    principal: Option<Principal>,
    v: Validated,
    kind: Kind,
    start: Instant,
) -> Result<HttpResponse, ApiError> {
    let sticky = sticky_key(&req, v.user.as_deref(), principal.as_ref());
    let target = if forced(&req)? {
        let t = state
            .router
            .resolve_forced(&v.model)
            .map_err(|e| route_error(e, &v.model))?;
        let adapter = t.route.as_ref().map(Name::as_str).unwrap_or_default();
        if !principal
            .as_ref()
            .is_some_and(|p| p.has(Role::Deployer) && p.may_touch(adapter))
        {
            return Err(ApiError::forbidden(format!(
                "x-loraops-arm: canary needs a deployer token for {adapter}"
            )));
        }
        t
    } else {
        state
            .router
            .resolve(&v.model, &sticky, may_pin_any(principal.as_ref(), &v.model))
            .await
            .map_err(|e| route_error(e, &v.model))?
    };
    if let Some((name, _)) = target.adapter() {
        auth::may_use(principal.as_ref(), name.as_str())?;
    }
    let shadow_job = shadow::pick(&state, &target, &sticky, &v.request);
    let Some(permit) = state.limiter.acquire().await else {
        state
            .metrics
            .rejected
            .with_label_values(&["overloaded"])
            .inc();
        return Err(ApiError::overloaded(
            "The gateway is at its concurrency limit; retry shortly.",
        ));
    };
    let keep_answer = shadow_job.as_ref().is_some_and(shadow::Job::wants_answer);
    let mut obs = Observer {
        state: state.clone(),
        labels: Labels::of(&target),
        route: target.route.clone(),
        arm: target.arm.as_str(),
        user: sticky,
        start,
        engine_start: Instant::now(),
        first_token: None,
        shadow: shadow_job,
        answer: None,
    };
    // A sample of what an adapter's rollout arms answer goes to the online judge.
    let judge_job = match (&state.judge, &obs.route) {
        (Some(j), Some(route)) if matches!(obs.arm, "stable" | "canary") && j.sample(&obs.user) => {
            Some(judge::Job {
                route: route.clone(),
                version: obs.labels.refs()[1].parse().unwrap_or(0),
                arm: obs.arm,
                question: judge::question(&v.request.prompt),
            })
        }
        _ => None,
    };
    let dispatched = match answers(&state, &target.key, &v).await {
        Ok(d) => d,
        Err(e) => {
            let e = engine_error(e);
            obs.finish(e.status.as_u16(), None);
            return Err(e);
        }
    };
    obs.engine_start = dispatched.started;
    let events = dispatched.events;
    let mut res = HttpResponse::Ok();
    let [a, ver, arm] = obs.labels.refs();
    // A forced request is the canary's, as the client asked; only metrics call it `forced`.
    let arm = if target.arm == Arm::Forced {
        "canary"
    } else {
        arm
    };
    let id = &dispatched.identity;
    let digest = match &target.key {
        crate::engine::EngineKey::Version { digest, .. } => digest.as_str(),
        crate::engine::EngineKey::Base => "",
    };
    for (name, value) in [
        ("x-loraops-adapter", a),
        ("x-loraops-version", ver),
        ("x-loraops-digest", digest),
        ("x-loraops-arm", arm),
        ("x-loraops-engine", id.name.as_str()),
        ("x-loraops-engine-version", id.version.as_str()),
        ("x-loraops-engine-quantization", id.quantization.as_str()),
    ] {
        if !value.is_empty()
            && let Ok(hv) = HeaderValue::from_str(value)
        {
            res.insert_header((HeaderName::from_static(name), hv));
        }
    }
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", random_id().simple()),
        Kind::Text => format!("cmpl-{}", random_id().simple()),
    };
    let shape = Shape {
        id,
        created: chrono::Utc::now().timestamp(),
        model: v.model,
        kind,
        include_usage: v.include_usage,
        tools: v.tools,
        logprobs: v.logprobs,
    };
    if v.stream {
        res.content_type("text/event-stream")
            .insert_header(("cache-control", "no-cache"));
        Ok(stream(
            &mut res,
            events,
            Forward::new(shape, v.n, obs, judge_job),
            permit,
        ))
    } else {
        let out = collect(events, v.n, &shape, &mut obs).await;
        drop(permit);
        match out {
            Ok((body, usage, answer)) => {
                if keep_answer {
                    obs.answer = Some(answer.clone());
                }
                obs.finish(200, Some(usage));
                if let Some(job) = judge_job {
                    judge::spawn(state.clone(), job, answer);
                }
                Ok(res.content_type("application/json").body(body))
            }
            Err(e) => {
                obs.finish(e.status.as_u16(), None);
                Err(e)
            }
        }
    }
}

/// Events of all `n` answers of a request, each tagged with its answer's index.
type Tagged = BoxStream<'static, (usize, Result<Event, EngineError>)>;

struct Answers {
    events: Tagged,
    identity: crate::engine::EngineInfo,
    started: Instant,
}

/// Start the request's `n` answers on `key`, each its own sequence in the engine's batch. With
/// a seed, answer `i` draws from `seed + i`, so the whole response repeats.
async fn answers(
    state: &AppState,
    key: &crate::engine::EngineKey,
    v: &Validated,
) -> Result<Answers, EngineError> {
    let mut streams = Vec::with_capacity(v.n);
    let mut first = None;
    for i in 0..v.n {
        let mut req = v.request.clone();
        req.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i as u64));
        let d = dispatch(state, key, req).await?;
        streams.push(d.events.map(move |e| (i, e)).boxed());
        first.get_or_insert((d.identity, d.started));
    }
    let (identity, started) = first.expect("n >= 1");
    Ok(Answers {
        events: futures_util::stream::select_all(streams).boxed(),
        identity,
        started,
    })
}

/// The whole response as one OpenAI body, its usage, and the first answer's text.
async fn collect(
    mut events: Tagged,
    n: usize,
    shape: &Shape,
    obs: &mut Observer,
) -> Result<(Vec<u8>, TokenUsage, String), ApiError> {
    let mut choices: Vec<Option<Choice>> = shape.choices(n).into_iter().map(Some).collect();
    let mut finished: Vec<Option<(Choice, String)>> = (0..n).map(|_| None).collect();
    let mut usage = TokenUsage::default();
    while let Some((i, ev)) = events.next().await {
        let Some(c) = choices[i].as_mut() else {
            continue;
        };
        match ev.map_err(engine_error)? {
            Event::Delta(d) => {
                obs.token();
                c.gather(&d);
            }
            Event::Logprobs(lps) => c.gather_logprobs(lps),
            Event::Done {
                finish_reason,
                usage: u,
            } => {
                usage.prompt_tokens = u.prompt_tokens;
                usage.completion_tokens += u.completion_tokens;
                let c = choices[i].take().expect("a running answer");
                finished[i] = Some((c, finish_reason));
                if finished.iter().all(Option::is_some) {
                    let finished: Vec<_> = finished.into_iter().flatten().collect();
                    let answer = finished[0].0.text.clone();
                    return Ok((shape.body(finished, usage), usage, answer));
                }
            }
        }
    }
    Err(ApiError::internal("the engine ended without finishing"))
}

/// How long a stream may wait for its client to take a frame: a client that stops reading
/// would otherwise hold its concurrency slot (and its generation) for as long as it likes.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Hand one frame to the client; false when it left or stopped reading for [`CLIENT_STALL`].
async fn send(tx: &mpsc::Sender<Result<Bytes, Infallible>>, frame: Bytes) -> bool {
    send_within(tx, frame, CLIENT_STALL).await
}

async fn send_within(
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    frame: Bytes,
    stall: std::time::Duration,
) -> bool {
    matches!(
        tokio::time::timeout(stall, tx.send(Ok(frame))).await,
        Ok(Ok(()))
    )
}

/// One streamed response: its answers' state, and what to record once it ends.
struct Forward {
    shape: Shape,
    choices: Vec<Choice>,
    usage: TokenUsage,
    running: usize,
    obs: Observer,
    judge_job: Option<judge::Job>,
}

/// Where a response stands after an event.
enum Step {
    More,
    /// Every answer finished: the last frames are `[DONE]`.
    Complete,
    /// The engine failed; the error went into the frames (headers are gone) and is recorded.
    Failed,
}

impl Forward {
    fn new(shape: Shape, n: usize, obs: Observer, judge_job: Option<judge::Job>) -> Self {
        Self {
            choices: shape.choices(n),
            shape,
            usage: TokenUsage::default(),
            running: n,
            obs,
            judge_job,
        }
    }

    /// The first frames: each answer's role.
    fn start(&self, frames: &mut Vec<Bytes>) {
        frames.extend(
            self.choices
                .iter()
                .filter_map(|c| self.shape.role_chunk(c.index)),
        );
    }

    /// The frames one engine event adds.
    fn event(&mut self, i: usize, ev: Result<Event, EngineError>, frames: &mut Vec<Bytes>) -> Step {
        let c = &mut self.choices[i];
        match ev {
            Ok(Event::Delta(d)) => {
                self.obs.token();
                self.shape.delta(c, &d, frames);
            }
            Ok(Event::Logprobs(lps)) => self.shape.logprobs(c, lps),
            Ok(Event::Done {
                finish_reason,
                usage: u,
            }) => {
                self.usage.prompt_tokens = u.prompt_tokens;
                self.usage.completion_tokens += u.completion_tokens;
                self.shape.done(c, &finish_reason, frames);
                self.running -= 1;
                if self.running == 0 {
                    if self.shape.include_usage {
                        frames.push(self.shape.usage_chunk(self.usage.into()));
                    }
                    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                    return Step::Complete;
                }
            }
            Err(e) => {
                let err = engine_error(e);
                frames.push(sse_error(&err));
                self.obs.finish(err.status.as_u16(), None);
                return Step::Failed;
            }
        }
        Step::More
    }

    /// Every frame was handed to the client: record the answer, and sample it for the judge.
    fn finished(&mut self) {
        let answer = std::mem::take(&mut self.choices[0].text);
        if self
            .obs
            .shadow
            .as_ref()
            .is_some_and(shadow::Job::wants_answer)
        {
            self.obs.answer = Some(answer.clone());
        }
        self.obs.finish(200, Some(self.usage));
        if let Some(job) = self.judge_job.take() {
            judge::spawn(self.obs.state.clone(), job, answer);
        }
    }
}

/// The SSE body. What the engine has ready now (an upstream's whole answer often is) is
/// framed at once, and a response complete by then is sent as it is, without a task or a
/// channel. Otherwise a task forwards the rest through a channel (see [`forward`]).
fn stream(
    res: &mut actix_web::HttpResponseBuilder,
    mut events: Tagged,
    mut fwd: Forward,
    permit: Permit,
) -> HttpResponse {
    let mut frames = Vec::new();
    fwd.start(&mut frames);
    // Polling with a no-op waker is safe: the task that takes over polls again with its own
    // before it waits.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let ended = loop {
        match events.poll_next_unpin(&mut cx) {
            std::task::Poll::Ready(Some((i, ev))) => match fwd.event(i, ev, &mut frames) {
                Step::More => {}
                Step::Complete => {
                    fwd.finished();
                    break true;
                }
                Step::Failed => break true,
            },
            std::task::Poll::Ready(None) => {
                fwd.obs.finish(500, None);
                break true;
            }
            std::task::Poll::Pending => break false,
        }
    };
    if ended {
        return res.streaming(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, Infallible>),
        ));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(forward(events, fwd, frames, permit, tx));
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    res.streaming(body)
}

/// Forward the rest of a stream's events as SSE frames, after `frames`. Holding `permit`
/// until the end keeps the concurrency limit honest for streams; a client that left (or
/// stopped reading) ends the stream, and dropping `events` stops generation.
async fn forward(
    mut events: Tagged,
    mut fwd: Forward,
    mut frames: Vec<Bytes>,
    permit: Permit,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let _permit = permit;
    let mut step = Step::More;
    loop {
        for f in frames.drain(..) {
            if !send(&tx, f).await {
                // A failure is already recorded; otherwise the client left.
                if !matches!(step, Step::Failed) {
                    fwd.obs.finish(499, None);
                }
                return;
            }
        }
        match step {
            Step::Complete => return fwd.finished(),
            Step::Failed => return,
            Step::More => {}
        }
        let Some((i, ev)) = events.next().await else {
            fwd.obs.finish(500, None);
            return;
        };
        step = fwd.event(i, ev, &mut frames);
    }
}

fn sse_error(err: &ApiError) -> Bytes {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, &err.body()).expect("serialisable error");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that stops reading frees its stream after the stall limit, instead of holding
    /// its concurrency slot for as long as it likes.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_let_go() {
        let stall = std::time::Duration::from_millis(50);
        let frame = || Bytes::from_static(b"data: {}\n\n");
        let (tx, mut rx) = mpsc::channel(1);
        assert!(send_within(&tx, frame(), stall).await);
        let start = std::time::Instant::now();
        assert!(!send_within(&tx, frame(), stall).await, "nobody reads");
        assert!(start.elapsed() >= stall);
        rx.recv().await.unwrap().unwrap();
        assert!(send_within(&tx, frame(), stall).await, "reading again");
        drop(rx);
        assert!(!send_within(&tx, frame(), stall).await, "gone");
    }
}
