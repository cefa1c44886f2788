//! How client writes travel in Raft log entries.
//!
//! Owns the byte layout of a [`Command`] (the payload of a normal log entry)
//! and nothing else: it never looks inside the request beyond decoding it, and
//! it never rejects a well-formed request for what it asks (that is
//! [`crate::kv::validate_request`]'s job before proposing, and
//! [`crate::kv::KvStore::apply`]'s after commit).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::pb::etcdserverpb::RequestOp;

/// A client write as it is proposed to Raft and applied from the log.
///
/// Layout (all integers little-endian):
///
/// ```text
/// +------------+-----------------+------------------------------------+
/// | version u8 | request_id u64  | RequestOp (prost encoding) ...     |
/// | = 1        |                 | to the end of the entry            |
/// +------------+-----------------+------------------------------------+
///  0            1                 9
/// ```
///
/// * `version` lets a later release change the layout; a decoder refuses a
///   version it does not know rather than guess.
/// * `request_id` is chosen by the proposing node so that it can match the
///   applied entry to the waiting client; it carries no meaning for the state
///   machine.
/// * The op is one of Put, DeleteRange or Txn; Range is served without the log
///   and never proposed (a logged Range would still apply as a read).
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub request_id: u64,
    pub op: RequestOp,
}

/// Why a log entry payload is not a [`Command`].
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command is empty")]
    Empty,
    #[error("command format version {0} is not known (expected {COMMAND_VERSION})")]
    UnknownVersion(u8),
    #[error("command header truncated: {len} bytes, need {COMMAND_HEADER_BYTES}")]
    TruncatedHeader { len: usize },
    #[error("command body is not a valid RequestOp: {0}")]
    BadProtobuf(#[from] prost::DecodeError),
}

/// The only layout this build writes and reads.
pub const COMMAND_VERSION: u8 = 1;
/// Version byte + request id.
pub const COMMAND_HEADER_BYTES: usize = 1 + 8;

impl Command {
    pub fn new(request_id: u64, op: RequestOp) -> Self {
        Command { request_id, op }
    }

    /// Encodes the command; the result is what a log entry carries.
    pub fn encode(&self) -> Bytes {
        Command::encode_parts(self.request_id, &self.op)
    }

    /// Encodes the command `(request_id, op)` without building it (the
    /// proposal path encodes the client's op in place, no copy).
    pub fn encode_parts(request_id: u64, op: &RequestOp) -> Bytes {
        let body_len = op.encoded_len();
        let mut buf = BytesMut::with_capacity(COMMAND_HEADER_BYTES + body_len);
        buf.put_u8(COMMAND_VERSION);
        buf.put_u64_le(request_id);
        // A BytesMut grows on demand, so encoding cannot run out of room.
        op.encode(&mut buf)
            .expect("BytesMut has unbounded capacity");
        debug_assert_eq!(buf.len(), COMMAND_HEADER_BYTES + body_len);
        buf.freeze()
    }

    /// Decodes a log entry payload. Never panics, whatever the bytes; byte
    /// fields of the op share `data`'s buffer (no copy).
    pub fn decode(mut data: Bytes) -> Result<Command, CommandError> {
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
        let op = RequestOp::decode(data)?;
        Ok(Command { request_id, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::etcdserverpb::{
        request_op::Request, Compare, DeleteRangeRequest, PutRequest, TxnRequest,
    };
    use proptest::prelude::*;

    fn put(key: &[u8], value: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: Bytes::copy_from_slice(key),
                value: Bytes::copy_from_slice(value),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn layout_is_version_then_id_then_op() {
        let cmd = Command::new(0x0102_0304_0506_0708, put(b"k", b"v"));
        let bytes = cmd.encode();
        assert_eq!(bytes[0], COMMAND_VERSION);
        assert_eq!(&bytes[1..9], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(RequestOp::decode(&bytes[9..]).unwrap(), cmd.op);
        assert_eq!(Command::decode(bytes).unwrap(), cmd);
    }

    #[test]
    fn clear_errors() {
        assert!(matches!(
            Command::decode(Bytes::new()),
            Err(CommandError::Empty)
        ));
        assert!(matches!(
            Command::decode(Bytes::from_static(&[7, 0, 0])),
            Err(CommandError::UnknownVersion(7))
        ));
        assert!(matches!(
            Command::decode(Bytes::from_static(&[1, 0, 0])),
            Err(CommandError::TruncatedHeader { len: 3 })
        ));
        // Field 2 (RequestPut), length-delimited, claims 50 bytes that are not there.
        let mut bad = vec![1u8; 1];
        bad.extend_from_slice(&9u64.to_le_bytes());
        bad.extend_from_slice(&[0x12, 50, 1, 2]);
        assert!(matches!(
            Command::decode(Bytes::from(bad)),
            Err(CommandError::BadProtobuf(_))
        ));
        // An empty body is a RequestOp with no request: well-formed, the
        // state machine rejects it.
        let cmd = Command::decode(Bytes::from_static(&[1, 5, 0, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!(cmd.request_id, 5);
        assert_eq!(cmd.op.request, None);
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
    }

    fn arb_leaf() -> impl Strategy<Value = RequestOp> {
        prop_oneof![
            (arb_bytes(), arb_bytes(), any::<i64>(), any::<bool>()).prop_map(
                |(key, value, lease, prev_kv)| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key,
                        value,
                        lease,
                        prev_kv,
                        ..Default::default()
                    })),
                }
            ),
            (arb_bytes(), arb_bytes(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
                RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key,
                        range_end,
                        prev_kv,
                    })),
                }
            }),
        ]
    }

    fn arb_op() -> impl Strategy<Value = RequestOp> {
        arb_leaf().prop_recursive(3, 24, 4, |inner| {
            (
                proptest::collection::vec((arb_bytes(), 0i32..4, any::<i64>()), 0..3),
                proptest::collection::vec(inner.clone(), 0..3),
                proptest::collection::vec(inner, 0..3),
            )
                .prop_map(|(compares, success, failure)| RequestOp {
                    request: Some(Request::RequestTxn(TxnRequest {
                        compare: compares
                            .into_iter()
                            .map(|(key, result, version)| Compare {
                                key,
                                result,
                                target_union: Some(
                                    crate::pb::etcdserverpb::compare::TargetUnion::Version(version),
                                ),
                                ..Default::default()
                            })
                            .collect(),
                        success,
                        failure,
                    })),
                })
        })
    }

    proptest! {
        #[test]
        fn round_trip(request_id in any::<u64>(), op in arb_op()) {
            let cmd = Command::new(request_id, op);
            prop_assert_eq!(Command::decode(cmd.encode()).unwrap(), cmd);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Command::decode(Bytes::from(data));
        }

        #[test]
        fn decode_never_panics_on_versioned_garbage(
            request_id in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut data = vec![COMMAND_VERSION];
            data.extend_from_slice(&request_id.to_le_bytes());
            data.extend_from_slice(&body);
            if let Ok(cmd) = Command::decode(Bytes::from(data)) {
                prop_assert_eq!(cmd.request_id, request_id);
            }
        }

        #[test]
        fn decode_never_panics_on_mutated_commands(
            op in arb_op(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut data = Command::new(1, op).encode().to_vec();
            for (at, x) in flips {
                let i = at.index(data.len());
                data[i] ^= x;
            }
            let keep = cut.index(data.len() + 1);
            data.truncate(keep);
            let _ = Command::decode(Bytes::from(data));
        }
    }
}
