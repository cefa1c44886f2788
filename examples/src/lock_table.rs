//! A replicated lock table: the state machine.
//!
//! A lock is a name; it is free or held by one owner (a `u64` the client
//! picks). Every grant carries a *fencing token*, the log index of the
//! command that granted it: tokens of one lock only grow, so a resource
//! guarded by the lock can refuse a stale holder by its token.
//!
//! Everything here is deterministic: the state is an ordered map, the only
//! number that is not in the command is the entry's log index, and no
//! clock or randomness is read.

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use skiff_node::{ApplyError, Committed, RestoreError, SnapshotView, StateMachine};

/// Longest lock name, bytes (the command and the snapshot store it as u16).
pub const LOCK_NAME_MAX: usize = 1024;
/// Locks in one snapshot at most: restore refuses a count above it before
/// reading on (a bound on what a corrupt header can make it allocate).
pub const LOCKS_MAX: u64 = 1 << 24;

const _: () = assert!(LOCK_NAME_MAX <= u16::MAX as usize);

/// What a client proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Take `lock` for `owner`. Re-entrant: the holder asking again gets
    /// its grant (and token) back, so a client may retry an acquire whose
    /// answer it lost.
    Acquire { lock: String, owner: u64 },
    /// Give `lock` back; only its holder can.
    Release { lock: String, owner: u64 },
}

/// The answer to one applied command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Granted {
        token: u64,
    },
    HeldBy {
        owner: u64,
    },
    Released,
    /// A release by someone other than the holder (`None`: the lock was
    /// free); nothing changed.
    NotHolder {
        holder: Option<u64>,
    },
}

/// A read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Who holds `lock`, with the grant's token.
    Holder(String),
    /// The whole table and its counters, to compare members.
    Dump,
}

/// A grant in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub owner: u64,
    pub token: u64,
}

/// The whole state, as `Query::Dump` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dump {
    pub locks: Vec<(String, Grant)>,
    /// Grants made to an owner that did not already hold the lock.
    pub grants: u64,
    /// Commands applied (refused ones included).
    pub commands: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryResponse {
    Holder(Option<Grant>),
    Dump(Dump),
}

/// The replicated state. `imbl::OrdMap` shares structure between clones:
/// [`StateMachine::snapshot`] freezes it in O(1) and the loop goes on
/// changing its own copy.
#[derive(Debug, Clone, Default)]
pub struct LockTable {
    locks: imbl::OrdMap<String, Grant>,
    grants: u64,
    commands: u64,
}

// ---- Command format.
//
// command = { u8 version = 1 | u8 op | u64 owner | u16 name_len | name }
//   op: 1 = acquire, 2 = release; integers little-endian; name is UTF-8,
//   at most LOCK_NAME_MAX bytes; nothing may follow the name.

const COMMAND_VERSION: u8 = 1;
const OP_ACQUIRE: u8 = 1;
const OP_RELEASE: u8 = 2;
const COMMAND_HEADER_LEN: usize = 1 + 1 + 8 + 2;

/// Appends the log form of `cmd` to `out`.
pub fn encode_command(cmd: &Command, out: &mut BytesMut) {
    let (op, lock, owner) = match cmd {
        Command::Acquire { lock, owner } => (OP_ACQUIRE, lock, *owner),
        Command::Release { lock, owner } => (OP_RELEASE, lock, *owner),
    };
    assert!(lock.len() <= LOCK_NAME_MAX, "lock name over LOCK_NAME_MAX");
    out.reserve(COMMAND_HEADER_LEN + lock.len());
    out.put_u8(COMMAND_VERSION);
    out.put_u8(op);
    out.put_u64_le(owner);
    out.put_u16_le(lock.len() as u16);
    out.put_slice(lock.as_bytes());
}

/// Reads a command written by [`encode_command`].
pub fn decode_command(b: &[u8]) -> Result<Command, String> {
    if b.len() < COMMAND_HEADER_LEN {
        return Err(format!(
            "command of {} bytes, shorter than its header",
            b.len()
        ));
    }
    if b[0] != COMMAND_VERSION {
        return Err(format!(
            "command version {}, expected {COMMAND_VERSION}",
            b[0]
        ));
    }
    let owner = u64::from_le_bytes(b[2..10].try_into().expect("8 bytes"));
    let name_len = u16::from_le_bytes([b[10], b[11]]) as usize;
    if name_len > LOCK_NAME_MAX {
        return Err(format!(
            "lock name of {name_len} bytes over {LOCK_NAME_MAX}"
        ));
    }
    let name = &b[COMMAND_HEADER_LEN..];
    if name.len() != name_len {
        return Err(format!(
            "lock name of {} bytes, header says {name_len}",
            name.len()
        ));
    }
    let lock = std::str::from_utf8(name)
        .map_err(|e| format!("lock name not UTF-8: {e}"))?
        .to_string();
    match b[1] {
        OP_ACQUIRE => Ok(Command::Acquire { lock, owner }),
        OP_RELEASE => Ok(Command::Release { lock, owner }),
        op => Err(format!("unknown op {op}")),
    }
}

impl LockTable {
    pub fn new() -> LockTable {
        LockTable::default()
    }

    fn apply_one(&mut self, index: u64, cmd: Command) -> Response {
        self.commands += 1;
        match cmd {
            Command::Acquire { lock, owner } => match self.locks.get(&lock) {
                Some(g) if g.owner == owner => Response::Granted { token: g.token },
                Some(g) => Response::HeldBy { owner: g.owner },
                None => {
                    self.grants += 1;
                    self.locks.insert(
                        lock,
                        Grant {
                            owner,
                            token: index,
                        },
                    );
                    Response::Granted { token: index }
                }
            },
            Command::Release { lock, owner } => match self.locks.get(&lock) {
                Some(g) if g.owner == owner => {
                    self.locks.remove(&lock);
                    Response::Released
                }
                other => Response::NotHolder {
                    holder: other.map(|g| g.owner),
                },
            },
        }
    }

    fn dump(&self) -> Dump {
        Dump {
            locks: self.locks.iter().map(|(k, g)| (k.clone(), *g)).collect(),
            grants: self.grants,
            commands: self.commands,
        }
    }
}

// ---- Snapshot format.
//
// snapshot = { magic "SKLT" | u8 version = 1 | u64 grants | u64 commands
//              | u64 count | count × lock | u32 crc32c }
// lock     = { u16 name_len | name | u64 owner | u64 token }
//   Little-endian; locks in name order; the CRC covers every byte before
//   it; nothing may follow it.

const SNAPSHOT_MAGIC: &[u8; 4] = b"SKLT";
const SNAPSHOT_VERSION: u8 = 1;

/// The frozen table, written on the runtime's snapshot thread.
pub struct Frozen(LockTable);

/// Passes writes through while computing their CRC.
struct CrcWriter<'a> {
    inner: &'a mut dyn Write,
    crc: u32,
}

impl Write for CrcWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl SnapshotView for Frozen {
    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let t = &self.0;
        let mut w = CrcWriter { inner: w, crc: 0 };
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[SNAPSHOT_VERSION])?;
        w.write_all(&t.grants.to_le_bytes())?;
        w.write_all(&t.commands.to_le_bytes())?;
        w.write_all(&(t.locks.len() as u64).to_le_bytes())?;
        for (name, g) in t.locks.iter() {
            debug_assert!(name.len() <= LOCK_NAME_MAX);
            w.write_all(&(name.len() as u16).to_le_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&g.owner.to_le_bytes())?;
            w.write_all(&g.token.to_le_bytes())?;
        }
        let crc = w.crc;
        w.inner.write_all(&crc.to_le_bytes())
    }
}

/// Reads the snapshot from a buffer, checking every length against what
/// is left before using it.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], RestoreError> {
        if self.b.len() < n {
            return Err(RestoreError::Corrupt(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.b.len()
            )));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u64(&mut self, what: &str) -> Result<u64, RestoreError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Restores a table from the bytes [`Frozen::write_to`] wrote.
pub fn restore_from(bytes: &[u8]) -> Result<LockTable, RestoreError> {
    let corrupt = |m: String| RestoreError::Corrupt(m);
    if bytes.len() < 4 + 1 + 8 * 3 + 4 {
        return Err(corrupt(format!(
            "{} bytes, shorter than a header",
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(corrupt(format!(
            "crc32c {computed:#010x}, stored {stored:#010x}"
        )));
    }
    let mut c = Cursor { b: body };
    if c.take(4, "magic")? != SNAPSHOT_MAGIC {
        return Err(corrupt("not a lock-table snapshot (magic)".into()));
    }
    let version = c.take(1, "version")?[0];
    if version != SNAPSHOT_VERSION {
        return Err(corrupt(format!(
            "version {version}, expected {SNAPSHOT_VERSION}"
        )));
    }
    let grants = c.u64("grants")?;
    let commands = c.u64("commands")?;
    let count = c.u64("count")?;
    if count > LOCKS_MAX {
        return Err(corrupt(format!("{count} locks, over LOCKS_MAX")));
    }
    let mut locks = imbl::OrdMap::new();
    let mut last: Option<String> = None;
    for _ in 0..count {
        let len = u16::from_le_bytes(c.take(2, "name length")?.try_into().expect("2 bytes"));
        if len as usize > LOCK_NAME_MAX {
            return Err(corrupt(format!("lock name of {len} bytes")));
        }
        let name = std::str::from_utf8(c.take(len as usize, "name")?)
            .map_err(|e| corrupt(format!("lock name not UTF-8: {e}")))?
            .to_string();
        if last.as_ref().is_some_and(|l| *l >= name) {
            return Err(corrupt(format!("lock {name:?} out of order")));
        }
        let owner = c.u64("owner")?;
        let token = c.u64("token")?;
        last = Some(name.clone());
        locks.insert(name, Grant { owner, token });
    }
    if !c.b.is_empty() {
        return Err(corrupt(format!("{} bytes after the last lock", c.b.len())));
    }
    Ok(LockTable {
        locks,
        grants,
        commands,
    })
}

impl StateMachine for LockTable {
    type Command = Command;
    type Response = Response;
    type Query = Query;
    type QueryResponse = QueryResponse;
    type Snapshot = Frozen;

    fn encode_command(cmd: &Command, out: &mut BytesMut) {
        encode_command(cmd, out);
    }

    fn check_command(command: &Bytes) -> Result<(), String> {
        decode_command(command).map(|_| ())
    }

    fn apply(&mut self, batch: &[Committed], out: &mut Vec<Response>) -> Result<(), ApplyError> {
        for entry in batch {
            let Some(bytes) = &entry.command else {
                continue;
            };
            let cmd = decode_command(bytes).map_err(|reason| ApplyError {
                index: entry.index,
                reason,
            })?;
            out.push(self.apply_one(entry.index, cmd));
        }
        Ok(())
    }

    fn query(&self, q: &Query) -> QueryResponse {
        match q {
            Query::Holder(lock) => QueryResponse::Holder(self.locks.get(lock).copied()),
            Query::Dump => QueryResponse::Dump(self.dump()),
        }
    }

    fn snapshot(&self) -> Frozen {
        Frozen(self.clone())
    }

    fn restore(r: &mut dyn Read) -> Result<LockTable, RestoreError> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        restore_from(&bytes)
    }

    fn gauges(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            ("locks_held", "Locks held now.", self.locks.len() as u64),
            ("lock_grants_total", "Locks granted.", self.grants),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(index: u64, cmd: &Command) -> Committed {
        let mut b = BytesMut::new();
        encode_command(cmd, &mut b);
        Committed {
            index,
            term: 1,
            command: Some(b.freeze()),
        }
    }

    fn acquire(lock: &str, owner: u64) -> Command {
        Command::Acquire {
            lock: lock.into(),
            owner,
        }
    }

    fn release(lock: &str, owner: u64) -> Command {
        Command::Release {
            lock: lock.into(),
            owner,
        }
    }

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        for cmd in [acquire("a", 7), release("", u64::MAX), acquire("ünï", 0)] {
            let mut b = BytesMut::new();
            encode_command(&cmd, &mut b);
            assert_eq!(decode_command(&b).unwrap(), cmd);
            // Every truncation and one extra byte are refused.
            for n in 0..b.len() {
                assert!(decode_command(&b[..n]).is_err(), "{cmd:?} cut at {n}");
            }
            let mut longer = b.to_vec();
            longer.push(0);
            assert!(decode_command(&longer).is_err());
        }
        assert!(decode_command(&[9; 12]).is_err(), "bad version");
    }

    #[test]
    fn grants_are_exclusive_reentrant_and_fenced() {
        let mut t = LockTable::new();
        let mut out = Vec::new();
        let cmds = [
            acquire("a", 1),
            acquire("a", 2),
            acquire("a", 1),
            release("a", 2),
            release("a", 1),
            acquire("a", 2),
            release("b", 1),
        ];
        let batch: Vec<Committed> = cmds
            .iter()
            .enumerate()
            .map(|(i, c)| committed(i as u64 + 10, c))
            .collect();
        t.apply(&batch, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                Response::Granted { token: 10 },
                Response::HeldBy { owner: 1 },
                Response::Granted { token: 10 },
                Response::NotHolder { holder: Some(1) },
                Response::Released,
                Response::Granted { token: 15 },
                Response::NotHolder { holder: None },
            ]
        );
        assert_eq!(t.grants, 2);
        assert_eq!(t.commands, 7);
    }

    #[test]
    fn runtime_entries_are_skipped() {
        let mut t = LockTable::new();
        let mut out = Vec::new();
        let noop = Committed {
            index: 1,
            term: 1,
            command: None,
        };
        t.apply(&[noop], &mut out).unwrap();
        assert!(out.is_empty());
        let bad = Committed {
            index: 2,
            term: 1,
            command: Some(Bytes::from_static(b"junk")),
        };
        assert_eq!(t.apply(&[bad], &mut out).unwrap_err().index, 2);
    }

    #[test]
    fn snapshot_round_trips_and_rejects_garbage() {
        let mut t = LockTable::new();
        let mut out = Vec::new();
        let batch: Vec<Committed> = (0..50)
            .map(|i| committed(i + 1, &acquire(&format!("lock-{i}"), i % 7)))
            .collect();
        t.apply(&batch, &mut out).unwrap();
        let mut bytes = Vec::new();
        t.snapshot().write_to(&mut bytes).unwrap();
        let back = LockTable::restore(&mut &bytes[..]).unwrap();
        assert_eq!(back.dump(), t.dump());

        // Every truncation, every flipped byte and a trailing byte fail.
        for n in 0..bytes.len() {
            assert!(restore_from(&bytes[..n]).is_err(), "cut at {n}");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(restore_from(&bad), Err(RestoreError::Corrupt(_))),
                "flip at {i}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(restore_from(&longer).is_err());
        assert!(LockTable::restore(&mut &b"garbage garbage garbage garbage!!"[..]).is_err());
    }
}
