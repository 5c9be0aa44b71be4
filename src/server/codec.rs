//! The protobuf codec of every generated service and client: prost's, except that a request whose bytes
//! are not a valid message (a bad varint, a truncated buffer, invalid UTF-8 in a string field) is the
//! caller's error, INVALID_ARGUMENT, not INTERNAL (prost's choice, following gRPC's status-code table):
//! INTERNAL is a server fault that clients and meshes treat as our bug, and retry. The edge layer counts
//! these calls. The generated code (clients too) uses this codec, so it depends on nothing else of the
//! server: it can hand tonic only a `Status`, which `ServeError::from_tonic` maps back into the table
//! by its prefix, [`MALFORMED`].
use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

/// How every malformed-message status starts.
pub const MALFORMED: &str = "malformed message";

#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as TonicCodec>::Encoder;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// prost's decoding with the error mapped (see the module comment).
#[derive(Debug, Clone, Default)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "{MALFORMED}: the bytes are not a valid {} ({e})",
                std::any::type_name::<U>().rsplit("::").next().unwrap_or("message")
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
