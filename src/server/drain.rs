//! The shutdown sequence (SIGTERM from the kubelet, or Ctrl-C): stop looking ready, refuse new calls,
//! give running ones the grace period, end what is left with UNAVAILABLE, then tell the transport to
//! close its connections.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use super::INFERENCE_SERVICE;
use super::calls::Calls;

/// How long the calls cut at the end of the grace period get to record their outcome and go.
const AFTER_GRACE: Duration = Duration::from_secs(1);

/// Waits for `shutdown`, drains, then sends `stop` (the transport's cue to close its connections).
/// `loading` is the model load still running, if any: cancelled and awaited first, so a load finishing
/// just now cannot report SERVING after the drain began.
pub(super) async fn on(
    shutdown: impl Future<Output = ()>,
    loading: JoinHandle<()>,
    reporter: HealthReporter,
    calls: Arc<Calls>,
    stop: oneshot::Sender<()>,
) {
    shutdown.await;
    loading.abort();
    let _ = loading.await;
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(INFERENCE_SERVICE, ServingStatus::NotServing).await;
    calls.start_draining();
    let grace = calls.grace();
    info!(inflight = calls.inflight(), grace_s = grace.as_secs_f64(), "draining: NOT_SERVING, new calls refused");
    if tokio::time::timeout(grace, calls.idle()).await.is_err() {
        warn!(inflight = calls.inflight(), "shutdown grace period over; ending the remaining calls with UNAVAILABLE");
        calls.end_grace();
        let _ = tokio::time::timeout(AFTER_GRACE, calls.idle()).await;
    }
    info!("drained");
    let _ = stop.send(());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_running_calls_then_stops() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", ServingStatus::Serving).await;
        let calls = Calls::new(Duration::from_secs(5));
        let running = calls.enter().unwrap();
        let (signal_tx, signal_rx) = oneshot::channel::<()>();
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let loading = tokio::spawn(std::future::pending::<()>());
        let drain = tokio::spawn(on(
            async {
                let _ = signal_rx.await;
            },
            loading,
            reporter,
            calls.clone(),
            stop_tx,
        ));
        signal_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(calls.is_draining() && calls.enter().is_err(), "new calls are refused once the drain begins");
        assert!(stop_rx.try_recv().is_err(), "a running call holds the transport open");
        drop(running);
        tokio::time::timeout(Duration::from_secs(1), drain).await.unwrap().unwrap();
        assert!(stop_rx.try_recv().is_ok(), "the transport is told to stop once the calls are done");
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_period_ends_calls_that_outlast_it() {
        let (reporter, _service) = tonic_health::server::health_reporter();
        let calls = Calls::new(Duration::from_secs(25));
        let stuck = calls.enter().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel();
        let grace_over = calls.grace_over();
        let drain = tokio::spawn(on(async {}, tokio::spawn(async {}), reporter, calls.clone(), stop_tx));
        // The paused clock jumps to the end of the grace period: the cut comes, then the stop.
        tokio::time::timeout(Duration::from_secs(30), grace_over).await.expect("the grace period ends");
        drop(stuck);
        drain.await.unwrap();
        assert!(stop_rx.await.is_ok());
    }
}
