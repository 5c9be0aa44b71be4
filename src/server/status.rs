//! The one table from errors to gRPC status codes.
use tonic::{Code, Status};

use crate::batcher::BatchError;
use crate::validate::ValidationError;

/// Everything a request can fail with, as the server sees it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("models are still loading; retry once health reports SERVING")]
    NotReady,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServeError> for Status {
    fn from(err: ServeError) -> Self {
        let code = match &err {
            ServeError::Invalid(ValidationError::UnknownModel { .. }) => Code::NotFound,
            ServeError::Invalid(_) => Code::InvalidArgument,
            ServeError::Batch(BatchError::QueueFull { .. }) => Code::ResourceExhausted,
            ServeError::Batch(BatchError::DeadlineExceeded { .. }) => Code::DeadlineExceeded,
            ServeError::Batch(BatchError::Closed(_)) | ServeError::NotReady => Code::Unavailable,
            ServeError::Batch(BatchError::Engine(_)) | ServeError::Internal(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_table() {
        let s: Status = ServeError::Invalid(ValidationError::NoInputs).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let s: Status = ServeError::Invalid(ValidationError::UnknownModel {
            kind: "embedding",
            name: "x".into(),
            loaded: "a".into(),
        })
        .into();
        assert_eq!(s.code(), Code::NotFound);
        let s: Status = ServeError::Batch(BatchError::QueueFull { model: "m".into(), max_queue: 3 }).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("overloaded"), "{}", s.message());
        let s: Status = ServeError::Batch(BatchError::DeadlineExceeded { model: "m".into(), waited_ms: 5 }).into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s: Status = ServeError::NotReady.into();
        assert_eq!(s.code(), Code::Unavailable);
    }
}
