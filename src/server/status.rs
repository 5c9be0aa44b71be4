//! The one table from errors to gRPC status codes (and to the `reason` label of the failure metric):
//! every status the server sends, and every outcome it records, starts as a [`ServeError`], so the
//! reason travels with the error and is never guessed back from a code. Overload answers carry a
//! `google.rpc.RetryInfo` in the standard `grpc-status-details-bin` trailer.
use std::time::Duration;

use prost::Message;
use tonic::{Code, Status};

use super::codec::MALFORMED;
use crate::batcher::BatchError;
use crate::engine::EngineError;
use crate::registry::RegistryError;
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
    #[error("server is shutting down and takes no new calls; retry on another replica")]
    ShuttingDown,
    #[error("server shut down: the {0:?} shutdown grace period ended before this call finished")]
    GraceOver(Duration),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("model control is off: start the server with --model-control-mode explicit to load and unload models")]
    ModelControlDisabled,
    #[error("internal error: {0}")]
    Internal(String),
    /// The request's bytes are not a valid message (from our codec, or tonic's framing).
    #[error("{MALFORMED}: {0}")]
    Malformed(String),
    #[error(
        "request metadata too large: {bytes} bytes (names and values plus 32 bytes per entry, as HTTP/2 counts \
         them), above this server's --max-header-bytes of {limit}; this is not overload: retrying the same call \
         will fail again"
    )]
    HeaderTooLarge { bytes: usize, limit: usize },
    #[error(
        "request message too large: {found}, above this server's --max-message-size of {limit} bytes; split the \
         request (this is not overload: retrying the same message will fail again)"
    )]
    MessageTooLarge { found: String, limit: usize },
    /// The deadline layer's timer ran out before the handler answered.
    #[error("deadline exceeded: {whose} of {} ms ran out", .timeout.as_millis())]
    Deadline { whose: &'static str, timeout: Duration },
    /// A call already running (a stream, or a handler whose future was dropped) passed its deadline.
    #[error("deadline exceeded: the call's deadline passed {0}")]
    DeadlinePassed(&'static str),
    /// The caller hung up before the answer: recorded, never sent.
    #[error("the client cancelled the call")]
    ClientCancelled,
    /// Any other error of the transport while reading a request stream, kept as tonic gave it.
    #[error("{1}")]
    Transport(Code, String),
}

impl ServeError {
    /// The gRPC code and a short reason for metrics, in one table.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            ServeError::Invalid(ValidationError::UnknownModel { .. } | ValidationError::UnknownVersion { .. }) => {
                (Code::NotFound, "unknown_model")
            }
            ServeError::Invalid(_) => (Code::InvalidArgument, "invalid_argument"),
            ServeError::Batch(BatchError::QueueFull { .. }) => (Code::ResourceExhausted, "queue_full"),
            ServeError::Batch(BatchError::DeadlineExceeded { .. }) => (Code::DeadlineExceeded, "deadline"),
            ServeError::Batch(BatchError::Closed(_)) => (Code::Unavailable, "model_stopped"),
            ServeError::NotReady => (Code::Unavailable, "loading"),
            ServeError::ShuttingDown => (Code::Unavailable, "shutting_down"),
            ServeError::GraceOver(_) => (Code::Unavailable, "grace_over"),
            ServeError::Batch(BatchError::Engine(EngineError::DeviceMemory(_))) => {
                (Code::ResourceExhausted, "device_memory")
            }
            ServeError::Batch(BatchError::Engine(_)) => (Code::Internal, "engine"),
            ServeError::Registry(
                RegistryError::NotInRepository { .. }
                | RegistryError::UnknownVersion { .. }
                | RegistryError::NotLoaded { .. },
            ) => (Code::NotFound, "unknown_model"),
            ServeError::Registry(
                RegistryError::KindChanged { .. }
                | RegistryError::CanaryWithoutStable { .. }
                | RegistryError::CanaryIsStable { .. },
            )
            | ServeError::ModelControlDisabled => (Code::FailedPrecondition, "model_control"),
            // The files on disk do not load (unreadable, malformed, too large for the limits): the
            // repository has to change before a retry can succeed.
            ServeError::Registry(_) => (Code::FailedPrecondition, "load_failed"),
            ServeError::Internal(_) => (Code::Internal, "internal"),
            ServeError::Malformed(_) => (Code::InvalidArgument, "malformed"),
            ServeError::HeaderTooLarge { .. } => (Code::ResourceExhausted, "header_too_large"),
            ServeError::MessageTooLarge { .. } => (Code::ResourceExhausted, "message_too_large"),
            ServeError::Deadline { .. } | ServeError::DeadlinePassed(_) => (Code::DeadlineExceeded, "deadline"),
            ServeError::ClientCancelled => (Code::Cancelled, "client_cancelled"),
            ServeError::Transport(code, _) => (*code, "transport"),
        }
    }

    /// The error that ends a request stream tonic could not read further: what [`Self::from_tonic`]
    /// knows, the client going away (a reset, a cancelled call), or else tonic's status as it is.
    pub fn from_stream_read(status: &Status, max_message_size: usize) -> ServeError {
        if let Some(e) = Self::from_tonic(status, max_message_size) {
            return e;
        }
        let m = status.message();
        if status.code() == Code::Cancelled || m.contains("stream no longer needed") || m.contains("reset") {
            return ServeError::ClientCancelled;
        }
        ServeError::Transport(status.code(), m.to_string())
    }

    /// tonic's own answers to a request it could not read, which no handler saw, as our errors (`None`
    /// for any other status): its framing errors (a body that ends inside a frame or before any
    /// message, bad gzip), which it answers INTERNAL, a server-fault code that clients and meshes treat
    /// as our bug and retry; a message above the decoding limit, OUT_OF_RANGE "decoded message length
    /// too large: found N bytes"; and our codec's own malformed-message answer (it can hand tonic only a
    /// `Status`, so the edge recovers the error from it here to count it). A compressed flag without
    /// grpc-encoding stays INTERNAL, as gRPC's compression spec requires.
    pub fn from_tonic(status: &Status, max_message_size: usize) -> Option<ServeError> {
        let m = status.message();
        match status.code() {
            Code::Internal
                if m == "Missing request message."
                    || m == "Unexpected EOF decoding stream."
                    || m.starts_with("Error decompressing:") =>
            {
                Some(ServeError::Malformed(m.to_string()))
            }
            Code::InvalidArgument => {
                m.strip_prefix(MALFORMED).map(|rest| ServeError::Malformed(rest.trim_start_matches(": ").to_string()))
            }
            // A gzip message that inflates past the limit.
            Code::ResourceExhausted if m.starts_with("Error decompressing") => Some(ServeError::MessageTooLarge {
                found: "more bytes once decompressed".into(),
                limit: max_message_size,
            }),
            Code::OutOfRange if m.contains("message length too large") => {
                let found = m
                    .split("found ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next())
                    .map(|n| format!("{n} bytes"))
                    .unwrap_or_else(|| "more bytes".into());
                Some(ServeError::MessageTooLarge { found, limit: max_message_size })
            }
            _ => None,
        }
    }
}

impl From<ServeError> for Status {
    fn from(err: ServeError) -> Self {
        let (code, _) = err.code_and_reason();
        if let ServeError::Batch(BatchError::QueueFull { retry_after, .. }) = &err {
            return Status::with_details(
                code,
                err.to_string(),
                retry_info(code, &err.to_string(), *retry_after).into(),
            );
        }
        Status::new(code, err.to_string())
    }
}

/// `google.rpc.Status` and `google.rpc.RetryInfo`: the two messages of the standard error model this
/// server sends, declared here rather than compiling Google's protos for them.
mod rpc {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<prost_types::Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RetryInfo {
        #[prost(message, optional, tag = "1")]
        pub retry_delay: Option<prost_types::Duration>,
    }
}

pub const RETRY_INFO_TYPE: &str = "type.googleapis.com/google.rpc.RetryInfo";

/// The `grpc-status-details-bin` payload: a `google.rpc.Status` holding one `RetryInfo`.
fn retry_info(code: Code, message: &str, delay: Duration) -> Vec<u8> {
    let info = rpc::RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    rpc::Status {
        code: code as i32,
        message: message.to_string(),
        details: vec![prost_types::Any { type_url: RETRY_INFO_TYPE.to_string(), value: info.encode_to_vec() }],
    }
    .encode_to_vec()
}

/// The retry delay in a status's details, if it carries a `RetryInfo` (for tests and clients).
pub fn retry_delay(status: &Status) -> Option<Duration> {
    let details = rpc::Status::decode(status.details()).ok()?;
    let any = details.details.iter().find(|a| a.type_url == RETRY_INFO_TYPE)?;
    let d = rpc::RetryInfo::decode(any.value.as_slice()).ok()?.retry_delay?;
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
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
        let s: Status = ServeError::Batch(BatchError::QueueFull {
            model: "m".into(),
            max_queue: 3,
            retry_after: Duration::from_millis(250),
        })
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("overloaded"), "{}", s.message());
        assert_eq!(retry_delay(&s), Some(Duration::from_millis(250)));
        let oom = ServeError::Batch(BatchError::Engine(EngineError::DeviceMemory("CUDA_ERROR_OUT_OF_MEMORY".into())));
        assert_eq!(oom.code_and_reason(), (Code::ResourceExhausted, "device_memory"));
        let s: Status = oom.into();
        assert!(s.message().contains("the device ran out of memory"), "{}", s.message());
        let s: Status = ServeError::Batch(BatchError::DeadlineExceeded { model: "m".into(), waited_ms: 5 }).into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        let s: Status = ServeError::NotReady.into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(retry_delay(&s), None);
        let s: Status = ServeError::ShuttingDown.into();
        assert_eq!(s.code(), Code::Unavailable);
        let s: Status = ServeError::ModelControlDisabled.into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("--model-control-mode explicit"), "{}", s.message());
        let s: Status = ServeError::Registry(RegistryError::UnknownVersion {
            name: "m".into(),
            version: 7,
            available: "1, 2".into(),
        })
        .into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("version 7") && s.message().contains("1, 2"), "{}", s.message());
        let s: Status = ServeError::HeaderTooLarge { bytes: 100_000, limit: 98_304 }.into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("100000 bytes") && s.message().contains("98304"), "{}", s.message());
        assert_eq!(retry_delay(&s), None, "not overload: no RetryInfo");
        let s: Status =
            ServeError::Deadline { whose: "the call's grpc-timeout", timeout: Duration::from_millis(250) }.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::DeadlineExceeded, "deadline exceeded: the call's grpc-timeout of 250 ms ran out")
        );
    }

    #[test]
    fn tonic_s_own_errors_map_into_the_table() {
        let eof = Status::internal("Unexpected EOF decoding stream.");
        let e = ServeError::from_tonic(&eof, 4096).unwrap();
        assert_eq!(e.code_and_reason(), (Code::InvalidArgument, "malformed"));
        assert!(Status::from(e).message().starts_with(MALFORMED));
        let ours: Status = ServeError::Malformed("the bytes are not a valid PredictRequest".into()).into();
        let back = ServeError::from_tonic(&ours, 4096).unwrap();
        assert_eq!(back.to_string(), ours.message(), "our own status maps back to itself");
        let big =
            Status::out_of_range("Error, decoded message length too large: found 5000 bytes, the limit is: 4096 bytes");
        let e = ServeError::from_tonic(&big, 4096).unwrap();
        assert_eq!(e.code_and_reason(), (Code::ResourceExhausted, "message_too_large"));
        assert!(e.to_string().contains("5000 bytes") && e.to_string().contains("4096"), "{e}");
        assert!(ServeError::from_tonic(&Status::out_of_range("index 3"), 4096).is_none());
        let inflated = Status::resource_exhausted("Error decompressing: size limit, of 4096 bytes, exceeded");
        assert_eq!(ServeError::from_tonic(&inflated, 4096).unwrap().code_and_reason().1, "message_too_large");
        let reset = Status::unknown("h2 protocol error: stream no longer needed");
        assert_eq!(ServeError::from_stream_read(&reset, 4096).code_and_reason().0, Code::Cancelled);
        let other = Status::internal("protocol error: received message with compressed-flag but no grpc-encoding");
        let e = ServeError::from_stream_read(&other, 4096);
        assert_eq!((e.code_and_reason(), e.to_string().as_str()), ((Code::Internal, "transport"), other.message()));
        assert!(ServeError::from_tonic(&Status::internal("Protocol error: compressed flag set"), 4096).is_none());
        assert!(ServeError::from_tonic(&Status::invalid_argument("inputs: at least 1"), 4096).is_none());
    }
}
