//! Clients of a running omnibus, outside the server's layers: the load generator (`omnibus bench`) and
//! the health check (`omnibus health`). They talk to a server only through the generated gRPC code
//! ([`crate::server::pb`], which depends on nothing of the server) and share only [`crate::units`].
pub mod bench;
pub mod health;
