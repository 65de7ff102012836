//! The scheduler's promises: concurrent requests, admission within the KV budget,
//! cancellation, stop sequences, seeds, and adapter swaps under running requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loraops_engine::{
    Constraint, Engine, EngineOptions, FinishReason, Request, SamplingParams, SubmitError,
};
use loraops_model::tiny::TinySpec;

use crate::helpers::{Shape, collect, engine, greedy, random_adapter, run, spec, tiny};

#[test]
fn concurrent_requests_on_different_adapters_each_get_their_own_answer() {
    let m = tiny(&spec());
    let tmp = tempfile::tempdir().unwrap();
    let e = engine(&m.dir);
    let adapters: Vec<_> = (0..3)
        .map(|i| {
            let dir = random_adapter(
                &tmp.path().join(i.to_string()),
                &m.config,
                i,
                &Shape::default(),
            );
            e.load_adapter(&format!("a{i}"), &dir).unwrap()
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..8)
        .map(|i| e.encode_text(&format!("question number {i}?")).unwrap())
        .collect();
    let pick = |i: usize| (i % 4 < 3).then(|| adapters[i % 4].clone());
    let alone: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| run(&e, p.clone(), pick(i), greedy(24)).ids)
        .collect();
    let receivers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            e.generate(Request {
                prompt: p.clone(),
                adapter: pick(i),
                sampling: greedy(24),
                constraint: None,
            })
            .unwrap()
        })
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let o = collect(rx);
        assert_eq!(o.ids, alone[i], "request {i}");
        assert_eq!(o.usage.prompt_tokens, prompts[i].len());
        assert_eq!(o.usage.completion_tokens, o.ids.len());
        assert!(o.finish.is_some());
    }
    assert!(e.stats().steps > 0);
}

#[test]
fn max_tokens_ends_with_length_and_stop_sequences_end_before_the_match() {
    let m = tiny(&spec());
    let e = engine(&m.dir);
    let prompt = e.encode_text("tell me a story").unwrap();
    let o = run(&e, prompt.clone(), None, greedy(12));
    if o.ids.len() == 12 {
        assert_eq!(o.finish, Some(FinishReason::Length));
    }
    assert!(o.text.chars().count() >= 2, "{:?}", o.text);
    // Stop on a piece of what greedy decoding writes: the answer ends right before it.
    let cut = o
        .text
        .char_indices()
        .nth(o.text.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = o.text[cut..].chars().take(2).collect();
    let first = o.text.find(&stop).unwrap();
    let mut s = greedy(12);
    s.stop = vec![stop.clone()];
    let stopped = run(&e, prompt, None, s);
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    assert_eq!(stopped.text, o.text[..first], "stop {stop:?}");
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let m = tiny(&spec());
    let e = engine(&m.dir);
    let prompt = e.encode_text("hello").unwrap();
    let sampled = |seed| {
        run(
            &e,
            prompt.clone(),
            None,
            SamplingParams {
                max_tokens: 32,
                temperature: 1.0,
                top_p: 0.95,
                seed: Some(seed),
                ..Default::default()
            },
        )
        .ids
    };
    let a = sampled(5);
    assert_eq!(a, sampled(5));
    assert_ne!(a, sampled(6));
}

#[test]
fn requests_wait_for_cache_or_are_refused_when_they_can_never_fit() {
    let m = tiny(&TinySpec::default());
    let mut opts = EngineOptions::new(&m.dir);
    // Per token: 2 (K, V) × 2 layers × 2 kv heads × 16 dims × 4 bytes = 512 bytes.
    opts.kv_cache_bytes = 512 * 100;
    let e = Engine::start(opts).unwrap();
    let prompt: Vec<u32> = (10..40).collect();
    let e_too_big = e
        .generate(Request {
            prompt: prompt.clone(),
            adapter: None,
            sampling: greedy(200),
            constraint: None,
        })
        .unwrap_err();
    assert!(
        matches!(&e_too_big, SubmitError::Rejected(m) if m.contains("KV cache")),
        "{e_too_big}"
    );
    // Two requests of 30 + 40 positions each: the second waits for the first, then runs.
    let s = greedy(41);
    let rxs: Vec<_> = (0..2)
        .map(|_| {
            e.generate(Request {
                prompt: prompt.clone(),
                adapter: None,
                sampling: s.clone(),
                constraint: None,
            })
            .unwrap()
        })
        .collect();
    for rx in rxs {
        let o = collect(rx);
        assert!(o.finish.is_some() && o.error.is_none());
    }
    wait_for_empty_cache(&e);
    let long = e
        .generate(Request {
            prompt: vec![1; 5000],
            adapter: None,
            sampling: greedy(1),
            constraint: None,
        })
        .unwrap_err();
    assert!(matches!(long, SubmitError::Rejected(m) if m.contains("context")));
}

/// The scheduler releases a finished sequence's cache on its next pass.
fn wait_for_empty_cache(e: &Engine) {
    let start = Instant::now();
    while e.stats().kv_used_bytes > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "cache not freed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_dropped_request_stops_and_frees_its_cache() {
    let m = tiny(&spec());
    let e = engine(&m.dir);
    let ctx = e.context_length();
    let mut rx = e
        .generate(Request {
            prompt: vec![1, 2, 3],
            adapter: None,
            sampling: SamplingParams {
                max_tokens: ctx - 3,
                temperature: 1.0,
                ..Default::default()
            },
            constraint: None,
        })
        .unwrap();
    rx.blocking_recv().unwrap();
    assert!(e.stats().kv_used_bytes > 0);
    drop(rx);
    wait_for_empty_cache(&e);
    assert_eq!(e.stats().running, 0);
}

/// Replacing an adapter while a request runs on it changes nothing for that request.
#[test]
fn an_adapter_swap_never_changes_a_running_request() {
    let m = tiny(&spec());
    let tmp = tempfile::tempdir().unwrap();
    let e = engine(&m.dir);
    let v1 = random_adapter(&tmp.path().join("v1"), &m.config, 1, &Shape::default());
    let v2 = random_adapter(&tmp.path().join("v2"), &m.config, 2, &Shape::default());
    let prompt = e.encode_text("swap").unwrap();
    let a1 = e.load_adapter("bot", &v1).unwrap();
    let want = run(&e, prompt.clone(), Some(a1.clone()), greedy(48)).ids;
    let mut rx = e
        .generate(Request {
            prompt: prompt.clone(),
            adapter: e.adapter("bot"),
            sampling: greedy(48),
            constraint: None,
        })
        .unwrap();
    let first = rx.blocking_recv();
    assert!(first.is_some());
    let a2 = e.load_adapter("bot", &v2).unwrap();
    assert!(!Arc::ptr_eq(&a1, &a2));
    let mut o = collect(rx);
    if let Some(loraops_engine::Event::Token { id: Some(t), .. }) = first {
        o.ids.insert(0, t);
    }
    assert_eq!(o.ids, want);
    assert_ne!(run(&e, prompt, e.adapter("bot"), greedy(48)).ids, want);
}

/// Constrained answers match their grammar even on a model that writes noise.
#[test]
fn constrained_answers_match_their_regex_and_schema() {
    let m = tiny(&spec());
    let e = engine(&m.dir);
    let prompt = e.encode_text("Score this answer from 1 to 10:").unwrap();
    let ask = |constraint, seed| {
        let rx = e
            .generate(Request {
                prompt: prompt.clone(),
                adapter: None,
                sampling: SamplingParams {
                    max_tokens: 60,
                    temperature: 1.0,
                    seed: Some(seed),
                    ..Default::default()
                },
                constraint: Some(constraint),
            })
            .unwrap();
        collect(rx)
    };
    let score =
        |s: &str| !s.starts_with('0') && s.parse::<u32>().is_ok_and(|n| (1..=10).contains(&n));
    for seed in 0..5 {
        let o = ask(Constraint::Regex("(10|[1-9])".into()), seed);
        assert!(score(&o.text), "{:?}", o.text);
        assert_eq!(o.finish, Some(FinishReason::Stop));
    }
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": false
    });
    for seed in 0..3 {
        let o = ask(Constraint::JsonSchema(schema.clone()), seed);
        if o.finish == Some(FinishReason::Stop) {
            let v: serde_json::Value =
                serde_json::from_str(&o.text).unwrap_or_else(|e| panic!("{e}: {:?}", o.text));
            assert!(v["name"].is_string() && v["n"].is_i64(), "{v}");
            assert_eq!(v.as_object().unwrap().len(), 2);
        }
    }
    let bad = e
        .generate(Request {
            prompt: prompt.clone(),
            adapter: None,
            sampling: greedy(4),
            constraint: Some(Constraint::Regex("(unclosed".into())),
        })
        .unwrap_err();
    assert!(matches!(bad, SubmitError::Rejected(m) if m.contains("constraint")));
}
