//! The loop that owns an embedding model's [`State`]: it takes new entries, answers expired ones, hands a
//! due batch to the model when the model is idle, and splits the results among the callers.
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use super::{BatchConfig, BatchError, EmbedStats, Embedded, Entry, Queued, State, ewma};
use crate::engine::{EmbedEngine, EngineError, EngineOutput, l2_normalize};
use crate::metrics;

/// A batch the model is computing.
struct InFlight {
    entries: Vec<Entry>,
    started: Instant,
    result: oneshot::Receiver<Result<EngineOutput, EngineError>>,
}

pub(super) async fn run(
    model: Arc<str>,
    mut rx: mpsc::Receiver<Entry>,
    engine: EmbedEngine,
    config: BatchConfig,
    stats: Arc<EmbedStats>,
) {
    let mut state: State<Entry> = State::new(config);
    let mut in_flight: Option<InFlight> = None;
    let mut open = true;
    loop {
        let now = Instant::now();
        for e in state.remove_stale(now) {
            metrics::EXPIRED_BEFORE_MODEL.with(&[&model]).inc();
            let waited_ms = now.duration_since(e.enqueued_at).as_millis() as u64;
            let _ = e.reply.send(Err(BatchError::DeadlineExceeded { model: model.clone(), waited_ms }));
        }
        // Only one batch computes at a time: while it runs, arrivals accumulate into the next one, which
        // is what makes batches grow with load without any window at all.
        if in_flight.is_none()
            && let Some(batch) = state.next_batch(now, stats.coming.load(Ordering::Acquire))
        {
            stats.running.store(batch.len(), Ordering::Relaxed);
            in_flight = Some(dispatch(&model, &engine, batch, now));
        }
        if !open && in_flight.is_none() && state.is_empty() {
            break;
        }
        let wakeup = state.next_wakeup(in_flight.is_none());
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(mut entry) => {
                    entry.announced = None;
                    state.push(entry);
                    // Take everything that arrived together before deciding, so they can share a batch.
                    while let Ok(mut entry) = rx.try_recv() {
                        entry.announced = None;
                        state.push(entry);
                    }
                }
                None => open = false,
            },
            result = async { (&mut in_flight.as_mut().expect("guarded by the select condition").result).await },
                if in_flight.is_some() => {
                let done = in_flight.take().expect("guarded by the select condition");
                state.batch_done(done.entries.len(), Instant::now());
                stats.running.store(0, Ordering::Relaxed);
                ewma(&stats.batch_us, done.started.elapsed());
                answer(&model, done, result);
            }
            _ = async { sleep_until(wakeup.expect("guarded by the select condition")).await }, if wakeup.is_some() => {}
        }
    }
    debug!(%model, "batcher stopped");
}

fn dispatch(model: &str, engine: &EmbedEngine, mut entries: Vec<Entry>, now: Instant) -> InFlight {
    let inputs: Vec<Vec<u32>> = entries.iter().flat_map(|e| e.request.inputs.iter().map(|i| i.ids.clone())).collect();
    for e in &mut entries {
        // Computing is not waiting: the queue has room again.
        e.permit = None;
        metrics::QUEUE_TIME.observe_duration(&[model], now.duration_since(e.enqueued_at));
    }
    metrics::BATCH_SIZE.observe(&[model], inputs.len() as f64);
    debug!(inputs = inputs.len(), requests = entries.len(), "batch dispatched");
    InFlight { entries, started: now, result: engine.submit(inputs) }
}

fn answer(
    model: &Arc<str>,
    done: InFlight,
    result: Result<Result<EngineOutput, EngineError>, oneshot::error::RecvError>,
) {
    let output = match result {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => {
            warn!(%model, error = %err, "batch failed");
            let msg = err.to_string();
            for e in done.entries {
                let _ = e.reply.send(Err(BatchError::Engine(EngineError::Batch(msg.clone()))));
            }
            return;
        }
        Err(_) => {
            for e in done.entries {
                let _ = e.reply.send(Err(BatchError::Engine(EngineError::Stopped)));
            }
            return;
        }
    };
    metrics::INFERENCE_TIME.observe_duration(&[model], output.elapsed);
    let batch_size = output.vectors.len();
    let batch_requests = done.entries.len();
    let mut vectors = output.vectors.into_iter();
    for e in done.entries {
        let mut mine: Vec<Vec<f32>> = vectors.by_ref().take(e.inputs()).collect();
        if e.request.normalize {
            mine.iter_mut().for_each(|v| l2_normalize(v));
        }
        let _ = e.reply.send(Ok(Embedded {
            vectors: mine,
            batch_size,
            batch_requests,
            queue_time: done.started.duration_since(e.enqueued_at),
            inference_time: output.elapsed,
        }));
    }
}
