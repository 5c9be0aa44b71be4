//! The loop that owns a generation model's [`GenState`]: admits, steps the engine, routes each step's
//! events to their callers, and removes sequences whose caller left or whose deadline passed.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use super::{Entry, GenConfig, GenEvent, GenState, GenStats, Leave};
use crate::batcher::BatchError;
use crate::batcher::ewma;
use crate::engine::{EngineError, GenEngine, SeqEvent, StepPlan};
use crate::metrics;

pub(super) async fn run(
    model: Arc<str>,
    mut rx: mpsc::Receiver<Entry>,
    engine: GenEngine,
    config: GenConfig,
    stats: Arc<GenStats>,
) {
    let mut state: GenState<Entry> = GenState::new(config);
    let mut open = true;
    loop {
        let now = Instant::now();
        for e in state.remove_stale_waiting(now) {
            stats.expired_waiting.fetch_add(1, Ordering::Relaxed);
            metrics::EXPIRED_BEFORE_MODEL.with(&[&model]).inc();
            let waited_ms = now.duration_since(e.enqueued_at).as_millis() as u64;
            let _ = e.tx.try_send(Err(BatchError::DeadlineExceeded { model: model.clone(), waited_ms }));
        }
        let mut plan = StepPlan::default();
        for (id, why) in state.leaving(now) {
            let e = state.finish(id).expect("leaving sequences are running");
            if why == Leave::Expired {
                let waited_ms = now.duration_since(e.enqueued_at).as_millis() as u64;
                let _ = e.tx.try_send(Err(BatchError::DeadlineExceeded { model: model.clone(), waited_ms }));
            }
            debug!(%model, id, ?why, "sequence removed");
            plan.drop.push(id);
        }
        let admitted: Vec<u64> = state.admit(now).into_iter().map(|(id, _)| id).collect();
        for id in admitted {
            let e = state.get_mut(id).expect("just admitted");
            e.permit = None;
            e.admitted_at = Some(now);
            metrics::QUEUE_TIME.observe_duration(&[&model], now.duration_since(e.enqueued_at));
            plan.admit.push((id, e.request.take().expect("admitted once")));
        }
        stats.running.store(state.running(), Ordering::Relaxed);
        stats.waiting.store(state.waiting(), Ordering::Relaxed);
        stats.kv_reserved.store(state.kv_reserved(), Ordering::Relaxed);

        if state.running() == 0 && plan.drop.is_empty() {
            if !open && state.waiting() == 0 {
                break;
            }
            let wakeup = state.next_wakeup();
            tokio::select! {
                msg = rx.recv(), if open => match msg {
                    Some(e) => state.push(e),
                    None => open = false,
                },
                _ = async { sleep_until(wakeup.expect("guarded")).await }, if wakeup.is_some() => {}
            }
            continue;
        }

        // One step. Arrivals meanwhile queue up for the next step's admission.
        metrics::BATCH_SIZE.observe(&[&model], state.running() as f64);
        let step_started = Instant::now();
        let mut reply = engine.submit(plan);
        let result = loop {
            tokio::select! {
                r = &mut reply => break r,
                msg = rx.recv(), if open => match msg {
                    Some(e) => state.push(e),
                    None => open = false,
                },
            }
        };
        let report = match result {
            Ok(Ok(report)) => report,
            Ok(Err(err)) => {
                fail_all(&mut state, &model, &err);
                continue;
            }
            Err(_) => {
                fail_all(&mut state, &model, &EngineError::Stopped);
                continue;
            }
        };
        let now = Instant::now();
        metrics::INFERENCE_TIME.observe_duration(&[&model], now.duration_since(step_started));
        for (id, event) in report.events {
            let Some(e) = state.get_mut(id) else { continue };
            match event {
                SeqEvent::PromptLogprobs(positions) => {
                    let _ = e.tx.try_send(Ok(GenEvent::PromptLogprobs(positions)));
                }
                SeqEvent::Token { token, index } => {
                    e.first_token_at.get_or_insert(now);
                    let _ = e.tx.try_send(Ok(GenEvent::Token {
                        id: token.id,
                        text: token.text,
                        logprob: token.logprob,
                        index,
                        top: token.top,
                    }));
                }
                SeqEvent::End { finish, stop, prompt_tokens, completion_tokens } => {
                    let admitted = e.admitted_at.unwrap_or(e.enqueued_at);
                    let first = e.first_token_at.unwrap_or(now);
                    ewma(&stats.sequence_us, now.duration_since(admitted));
                    metrics::PROMPT_TOKENS.with(&[&model]).add(prompt_tokens as i64);
                    metrics::GENERATED_TOKENS.with(&[&model]).add(completion_tokens as i64);
                    metrics::TIME_TO_FIRST_TOKEN.observe_duration(&[&model], first.duration_since(e.enqueued_at));
                    if completion_tokens > 1 {
                        metrics::TIME_PER_OUTPUT_TOKEN
                            .observe_duration(&[&model], now.duration_since(first) / (completion_tokens - 1));
                    }
                    let _ = e.tx.try_send(Ok(GenEvent::End {
                        finish,
                        stop,
                        prompt_tokens,
                        completion_tokens,
                        queue_time: admitted.duration_since(e.enqueued_at),
                        time_to_first_token: e.first_token_at.unwrap_or(now).duration_since(e.enqueued_at),
                        total: now.duration_since(e.enqueued_at),
                    }));
                    state.finish(id);
                }
                SeqEvent::Failed(msg) => {
                    let _ = e.tx.try_send(Err(BatchError::Engine(EngineError::Batch(msg))));
                    state.finish(id);
                }
            }
        }
    }
    debug!(%model, "generation scheduler stopped");
}

fn fail_all(state: &mut GenState<Entry>, model: &Arc<str>, err: &EngineError) {
    warn!(%model, error = %err, "generation step failed; ending every running sequence");
    let ids: Vec<u64> = state.running_ids();
    for id in ids {
        if let Some(e) = state.finish(id) {
            let _ = e.tx.try_send(Err(BatchError::Engine(err.for_each_call())));
        }
    }
}
