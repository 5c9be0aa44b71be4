//! Clients of a running omnibus, outside the server's layers: the load generator (`omnibus bench`), the
//! health check (`omnibus health`) and the agreement check of two servers (`omnibus compare`). They talk to a server only through the generated gRPC code
//! ([`crate::server::pb`], which depends on nothing of the server) and share only [`crate::units`].
pub mod bench;
pub mod compare;
pub mod health;
