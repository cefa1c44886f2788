//! How client commands travel in Raft log entries.
//!
//! Owns the byte layout of a command entry (the payload of a normal log
//! entry) and nothing else: the state machine's bytes inside it are opaque
//! here ([`crate::StateMachine::encode_command`] writes them,
//! [`crate::StateMachine::apply`] reads them).
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! +------------+-----------------+------------------------------------+
//! | version u8 | request_id u64  | the state machine's command ...    |
//! | = 1        |                 | to the end of the entry            |
//! +------------+-----------------+------------------------------------+
//!  0            1                 9
//! ```
//!
//! * `version` lets a later release change the layout; a decoder refuses a
//!   version it does not know rather than guess. It is never 0xFE, the tag
//!   of a stored membership entry (`crate::storage`).
//! * `request_id` is chosen by the proposing member so that it can match
//!   the applied entry to the waiting client; it carries no meaning for the
//!   state machine.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Why a log entry payload is not a command entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command is empty")]
    Empty,
    #[error("command format version {0} is not known (expected {COMMAND_VERSION})")]
    UnknownVersion(u8),
    #[error("command header truncated: {len} bytes, need {COMMAND_HEADER_BYTES}")]
    TruncatedHeader { len: usize },
}

/// The only layout this build writes and reads.
pub const COMMAND_VERSION: u8 = 1;
/// Version byte + request id.
pub const COMMAND_HEADER_BYTES: usize = 1 + 8;

/// Encodes a command entry: the header, then what `body` appends (the
/// state machine's encoding, written in place: no copy).
pub fn encode(request_id: u64, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(COMMAND_HEADER_BYTES + 64);
    buf.put_u8(COMMAND_VERSION);
    buf.put_u64_le(request_id);
    body(&mut buf);
    buf.freeze()
}

/// Splits a command entry into its request id and the state machine's
/// bytes (sharing `data`'s buffer). Never panics, whatever the bytes.
pub fn decode(mut data: Bytes) -> Result<(u64, Bytes), CommandError> {
    let Some(&version) = data.first() else {
        return Err(CommandError::Empty);
    };
    if version != COMMAND_VERSION {
        return Err(CommandError::UnknownVersion(version));
    }
    if data.len() < COMMAND_HEADER_BYTES {
        return Err(CommandError::TruncatedHeader { len: data.len() });
    }
    data.advance(1);
    let request_id = data.get_u64_le();
    Ok((request_id, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_version_then_id_then_body() {
        let bytes = encode(0x0102_0304_0506_0708, |b| b.extend_from_slice(b"op"));
        assert_eq!(bytes[0], COMMAND_VERSION);
        assert_eq!(&bytes[1..9], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[9..], b"op");
        let (id, body) = decode(bytes).unwrap();
        assert_eq!((id, &body[..]), (0x0102_0304_0506_0708, &b"op"[..]));
    }

    #[test]
    fn clear_errors() {
        assert_eq!(decode(Bytes::new()), Err(CommandError::Empty));
        assert_eq!(
            decode(Bytes::from_static(&[7, 0, 0])),
            Err(CommandError::UnknownVersion(7))
        );
        assert_eq!(
            decode(Bytes::from_static(&[1, 0, 0])),
            Err(CommandError::TruncatedHeader { len: 3 })
        );
        // An empty body is well-formed here; the state machine judges it.
        let (id, body) = decode(Bytes::from_static(&[1, 5, 0, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!((id, body.len()), (5, 0));
        assert_ne!(COMMAND_VERSION, crate::storage::MEMBERSHIP_TAG);
    }

    proptest! {
        #[test]
        fn round_trip(request_id in any::<u64>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = encode(request_id, |b| b.extend_from_slice(&body));
            let (id, got) = decode(bytes).unwrap();
            prop_assert_eq!(id, request_id);
            prop_assert_eq!(&got[..], &body[..]);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(Bytes::from(data));
        }
    }
}
