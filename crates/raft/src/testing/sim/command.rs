//! The simulated application: client commands carried in entry payloads, the
//! key-value state machine that applies them, and its snapshots.
//!
//! Owns the byte layouts of commands and snapshots and the rule that turns a
//! command into an answer. It never looks at the cluster: the simulation
//! decides who applies what and when.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::testing::linearizability::{Input, Output};
use crate::types::{Entry, Index, Payload};

/// A client's command as it travels in [`Payload::Normal`].
///
/// Layout (little-endian, 39 bytes):
///
/// ```text
/// cmd = { u8 version=1 | u8 kind | u32 client | u64 op | u64 key
///       | u64 value | u8 has_expect | u64 expect }
/// kind: 1 Put { key, value }, 2 Get { key }, 3 Cas { key, expect, new: value }
/// ```
///
/// `value` is 0 and `has_expect` 0 where the kind has none; `expect` is only
/// meaningful with `has_expect == 1` (`None` otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub client: u32,
    /// Unique per client; never reused, even when the outcome is unknown.
    pub op: u64,
    pub input: Input,
}

const CMD_VERSION: u8 = 1;
const CMD_BYTES: usize = 39;
const KIND_PUT: u8 = 1;
const KIND_GET: u8 = 2;
const KIND_CAS: u8 = 3;

impl Command {
    pub fn encode(&self) -> Bytes {
        let (kind, key, value, expect) = match self.input {
            Input::Put { key, value } => (KIND_PUT, key, value, None),
            Input::Get { key } => (KIND_GET, key, 0, None),
            Input::Cas { key, expect, new } => (KIND_CAS, key, new, Some(expect)),
        };
        let mut out = Vec::with_capacity(CMD_BYTES);
        out.push(CMD_VERSION);
        out.push(kind);
        out.extend_from_slice(&self.client.to_le_bytes());
        out.extend_from_slice(&self.op.to_le_bytes());
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
        let expect = expect.flatten();
        out.push(u8::from(expect.is_some()));
        out.extend_from_slice(&expect.unwrap_or(0).to_le_bytes());
        debug_assert_eq!(out.len(), CMD_BYTES);
        Bytes::from(out)
    }

    pub fn decode(data: &[u8]) -> Result<Command, String> {
        if data.len() != CMD_BYTES {
            return Err(format!("command of {} bytes, want {CMD_BYTES}", data.len()));
        }
        if data[0] != CMD_VERSION {
            return Err(format!("command version {}", data[0]));
        }
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        let client = u32::from_le_bytes(data[2..6].try_into().expect("4 bytes"));
        let (op, key, value) = (u64_at(6), u64_at(14), u64_at(22));
        let expect = match data[30] {
            0 => None,
            1 => Some(u64_at(31)),
            b => return Err(format!("has_expect byte {b}")),
        };
        let input = match data[1] {
            KIND_PUT => Input::Put { key, value },
            KIND_GET => Input::Get { key },
            KIND_CAS => Input::Cas {
                key,
                expect,
                new: value,
            },
            k => return Err(format!("command kind {k}")),
        };
        Ok(Command { client, op, input })
    }
}

/// The key-value state machine of one node: applies entries in log order and
/// answers commands. `digest` chains every applied entry (index, term and
/// payload, no-ops included), so two machines at the same index with the
/// same digest applied the same log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kv {
    pub map: BTreeMap<u64, u64>,
    /// Highest index applied (or restored from a snapshot).
    pub applied: Index,
    pub digest: u64,
}

impl Kv {
    /// Applies `entry`, the next one in the log. Returns the command it
    /// carried and its answer (`None` for no-ops and membership entries).
    pub fn apply(&mut self, entry: &Entry) -> Result<Option<(Command, Output)>, String> {
        if entry.index != self.applied + 1 {
            return Err(format!(
                "applied index {} after {}: entries must be applied in order",
                entry.index, self.applied
            ));
        }
        self.applied = entry.index;
        self.digest = digest_entry(self.digest, entry);
        let Payload::Normal(data) = &entry.payload else {
            return Ok(None);
        };
        let cmd = Command::decode(data)?;
        let output = match cmd.input {
            Input::Put { key, value } => {
                self.map.insert(key, value);
                Output::Ok
            }
            Input::Get { key } => Output::Value(self.map.get(&key).copied()),
            Input::Cas { key, expect, new } => {
                let swap = self.map.get(&key).copied() == expect;
                if swap {
                    self.map.insert(key, new);
                }
                Output::Cas(swap)
            }
        };
        Ok(Some((cmd, output)))
    }

    /// A snapshot of this machine.
    ///
    /// Layout (little-endian):
    ///
    /// ```text
    /// snapshot = { u8 version=1 | u64 applied | u64 digest | u32 n | n × (u64 key | u64 value) }
    /// ```
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(21 + 16 * self.map.len());
        out.push(SNAP_VERSION);
        out.extend_from_slice(&self.applied.to_le_bytes());
        out.extend_from_slice(&self.digest.to_le_bytes());
        out.extend_from_slice(&(self.map.len() as u32).to_le_bytes());
        for (k, v) in &self.map {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Bytes::from(out)
    }

    pub fn decode(data: &[u8]) -> Result<Kv, String> {
        if data.len() < 21 || data[0] != SNAP_VERSION {
            return Err(format!("bad snapshot header ({} bytes)", data.len()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(data[17..21].try_into().expect("4 bytes")) as usize;
        if data.len() != 21 + 16 * n {
            return Err(format!("snapshot of {} bytes for {n} keys", data.len()));
        }
        let map = (0..n)
            .map(|i| (u64_at(21 + 16 * i), u64_at(29 + 16 * i)))
            .collect();
        Ok(Kv {
            map,
            applied: u64_at(1),
            digest: u64_at(9),
        })
    }
}

const SNAP_VERSION: u8 = 1;

/// The next link of an applied-log digest chain.
pub fn digest_entry(prev: u64, entry: &Entry) -> u64 {
    let mut h = mix(prev ^ entry.index);
    h = mix(h ^ entry.term);
    match &entry.payload {
        Payload::Noop => mix(h ^ 0x6e6f_6f70),
        Payload::Normal(b) => mix(hash_bytes(h ^ 1, b)),
        Payload::Membership(m) => {
            let mut h = mix(h ^ 2);
            for set in [&m.voters, &m.outgoing, &m.learners] {
                h = mix(h ^ set.len() as u64);
                for &id in set {
                    h = mix(h ^ id);
                }
            }
            h
        }
    }
}

/// A 64-bit hash of `bytes` from `seed` (deterministic across runs and
/// platforms, unlike `std`'s hashers).
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ bytes.len() as u64;
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    h
}

/// SplitMix64's finaliser: a cheap, well-mixing step for digests and hashes.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
