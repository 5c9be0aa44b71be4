//! `omnibus health`: asks a running omnibus's grpc.health.v1.Health whether a service is SERVING (the
//! container image's HEALTHCHECK). A client: it knows the server only through the health protocol.
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tonic::transport::Endpoint;

use crate::units::parse_duration;

/// A parser of its own too, so the image's HEALTHCHECK line can be checked alone.
#[derive(Debug, Clone, Parser)]
#[command(name = "omnibus health")]
pub struct HealthArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// The service to ask about; empty means the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Ok(true) when the server reports SERVING for the service.
pub async fn health(args: HealthArgs) -> anyhow::Result<bool> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let check = async {
        let channel = Endpoint::from_shared(args.addr.clone())?.connect().await?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await?
            .into_inner()
            .status;
        anyhow::Ok(status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(args.timeout, check).await.context("health check timed out")?
}
