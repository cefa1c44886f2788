//! Alarms and the space quota in the store and the state machine, checked
//! against etcd's semantics (`server/etcdserver/api/v3alarm`,
//! `server/etcdserver/apply/capped.go`, `server/storage/quota.go`): alarms
//! raised and disarmed through apply, what an active NOSPACE refuses and
//! what it lets through, the command encoding, snapshots (format v4 with
//! alarms; v3 and v2 still read; forged alarm tables refused), what the
//! member's quota tells the API, and install keeping the quota.

use bytes::{Bytes, BytesMut};
use skiff_kv::machine::{
    decode_command, KvCommand, KvMachine, KvQuery, KvQueryResponse, KvResponse, Quota, QuotaCheck,
    QUOTA_BYTES_DEFAULT, TAG_ALARM,
};
use skiff_kv::pb::etcdserverpb::request_op::Request;
use skiff_kv::pb::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use skiff_kv::store::{
    write_cost, Alarm, AlarmKind, GrpcCode, KvError, KvStore, KEY_OVERHEAD_BYTES, LEASE_COST_BYTES,
    SNAPSHOT_VERSION, VERSION_OVERHEAD_BYTES,
};
use skiff_node::{Committed, SnapshotView, StateMachine};

const NOSPACE: AlarmKind = AlarmKind::NoSpace;
const CORRUPT: AlarmKind = AlarmKind::Corrupt;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: b(key),
            value: b(value),
            ..Default::default()
        })),
    }
}

fn del(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: b(key),
            range_end: b(range_end),
            prev_kv: false,
        })),
    }
}

fn range(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: b(key),
            ..Default::default()
        })),
    }
}

fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestTxn(TxnRequest {
            compare: Vec::new(),
            success,
            failure,
        })),
    }
}

fn value_of(store: &KvStore, key: &str) -> Option<Bytes> {
    store
        .range(&RangeRequest {
            key: b(key),
            ..Default::default()
        })
        .unwrap()
        .kvs
        .pop()
        .map(|kv| kv.value)
}

/// A store and the next log index to apply at.
struct Harness {
    store: KvStore,
    index: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            store: KvStore::new(),
            index: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn apply(&mut self, op: &RequestOp) -> Result<(), KvError> {
        let i = self.next();
        let r = self.store.apply(i, op).map(|_| ());
        self.store.check_invariants();
        r
    }

    /// Runs `f` on the store with the next log index.
    fn at<T>(&mut self, f: impl FnOnce(&mut KvStore, u64) -> T) -> T {
        let i = self.next();
        f(&mut self.store, i)
    }

    fn raise(&mut self, member: u64, kind: AlarmKind) -> Alarm {
        let i = self.next();
        self.store.alarm_activate(i, member, kind)
    }

    fn disarm(&mut self, member: u64, kind: AlarmKind) -> Option<Alarm> {
        let i = self.next();
        self.store.alarm_deactivate(i, member, kind)
    }

    fn alarms(&self) -> Vec<Alarm> {
        self.store.alarms().collect()
    }
}

fn snapshot_of(store: &KvStore) -> Vec<u8> {
    let mut out = Vec::new();
    store.write_snapshot(&mut out).unwrap();
    out
}

fn read(bytes: &[u8]) -> Result<KvStore, skiff_kv::store::SnapshotError> {
    KvStore::read_snapshot(&mut std::io::Cursor::new(bytes))
}

fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let crc = crc32c::crc32c(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
}

/// The auth section of a store whose auth was never used: its length
/// (4), enabled (1), revision (8), three empty counts (12).
const AUTH_SECTION_EMPTY: usize = 4 + 1 + 8 + 12;

/// Where the alarm count of a snapshot whose auth was never used
/// starts: before the trailer, the auth section and the alarms.
fn alarm_count_at(bytes: &[u8], alarms: usize) -> usize {
    bytes.len() - 4 - AUTH_SECTION_EMPTY - 9 * alarms - 8
}

/// A current (v6) snapshot whose revisions wrote one key each, as v5
/// wrote it: no `sub` field (all 0 here) in the records.
fn as_v5(v6: &[u8]) -> Vec<u8> {
    const HEADER: usize = 33;
    // kind, key_len, value_len, mod, create, version, lease; then sub.
    const BEFORE_SUB: usize = 1 + 4 + 4 + 8 + 8 + 8 + 8;
    let u32_at = |at: usize| u32::from_le_bytes(v6[at..at + 4].try_into().unwrap()) as usize;
    let mut v5 = v6[..HEADER].to_vec();
    v5[8] = 5;
    let mut at = HEADER;
    while v6[at] != 0 {
        let (key_len, value_len) = (u32_at(at + 1), u32_at(at + 5));
        assert_eq!(u32_at(at + BEFORE_SUB), 0, "one write per revision");
        v5.extend_from_slice(&v6[at..at + BEFORE_SUB]);
        let rest = at + BEFORE_SUB + 4;
        v5.extend_from_slice(&v6[rest..rest + key_len + value_len]);
        at = rest + key_len + value_len;
    }
    v5.extend_from_slice(&v6[at..]);
    reseal(&mut v5);
    v5
}

/// A v6 snapshot whose auth was never used and whose revisions wrote one
/// key each, as v4 wrote it (no auth section, no `sub`).
fn as_v4(v6: &[u8]) -> Vec<u8> {
    let v5 = as_v5(v6);
    let n = v5.len() - 4 - AUTH_SECTION_EMPTY;
    let mut v4 = v5[..n].to_vec();
    v4.extend_from_slice(&[0; 4]);
    v4[8] = 4;
    reseal(&mut v4);
    v4
}

// ---------------------------------------------------------------------------
// The store

#[test]
fn alarms_are_a_set_of_member_and_kind() {
    let mut h = Harness::new();
    let revision = h.store.revision();
    assert_eq!(h.alarms(), []);
    let a = h.raise(7, NOSPACE);
    assert_eq!(
        a,
        Alarm {
            member: 7,
            kind: NOSPACE
        }
    );
    // Raising again is a no-op answered with the same alarm (as etcd).
    assert_eq!(h.raise(7, NOSPACE), a);
    h.raise(3, NOSPACE);
    h.raise(7, CORRUPT);
    assert_eq!(
        h.alarms(),
        [
            Alarm {
                member: 3,
                kind: NOSPACE
            },
            a,
            Alarm {
                member: 7,
                kind: CORRUPT
            }
        ]
    );
    assert!(h.store.alarm_active(NOSPACE) && h.store.alarm_active(CORRUPT));
    // Disarming one member's alarm leaves the others.
    assert_eq!(h.disarm(7, NOSPACE), Some(a));
    assert_eq!(h.disarm(7, NOSPACE), None);
    assert!(h.store.alarm_active(NOSPACE), "member 3's is still active");
    assert_eq!(
        h.disarm(3, NOSPACE),
        Some(Alarm {
            member: 3,
            kind: NOSPACE
        })
    );
    assert!(!h.store.alarm_active(NOSPACE));
    assert!(h.store.alarm_active(CORRUPT));
    // Alarms move the applied index, never the revision.
    assert_eq!(h.store.revision(), revision);
    assert_eq!(h.store.applied_index(), h.index);
    assert_eq!(
        Alarm {
            member: 10276657743932975437,
            kind: NOSPACE
        }
        .to_string(),
        "memberID:10276657743932975437 alarm:NOSPACE",
        "as etcdctl alarm list prints it"
    );
}

#[test]
fn nospace_refuses_what_grows_the_store_and_lets_the_rest_through() {
    let mut h = Harness::new();
    h.apply(&put("a", "1")).unwrap();
    h.apply(&put("b", "2")).unwrap();
    assert_eq!(h.at(|s, i| s.lease_grant(i, 5, 10)), Ok(()));
    h.apply(&RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: b("l"),
            value: b("x"),
            lease: 5,
            ..Default::default()
        })),
    })
    .unwrap();
    h.raise(1, NOSPACE);
    let revision = h.store.revision();
    let stats = h.store.stats();

    // Refused, applied (the index moves), nothing else changes.
    let refused = [
        put("a", "2"),
        put("new", "v"),
        txn(vec![put("c", "3")], vec![]),
        txn(vec![], vec![put("c", "3")]),
        txn(vec![range("a")], vec![put("c", "3")]),
        txn(vec![txn(vec![], vec![put("deep", "1")])], vec![]),
    ];
    for op in &refused {
        let index = h.index + 1;
        assert_eq!(h.apply(op), Err(KvError::NoSpace), "{op:?}");
        assert_eq!(h.store.applied_index(), index);
        assert_eq!(h.store.revision(), revision);
    }
    assert_eq!(h.at(|s, i| s.lease_grant(i, 6, 10)), Err(KvError::NoSpace));
    assert!(h.store.lease(6).is_none());
    assert_eq!(value_of(&h.store, "a"), Some(b("1")));
    assert_eq!(value_of(&h.store, "new"), None);
    assert_eq!(h.store.stats(), stats);

    // Reads, deletes, txns without puts, compaction, revokes and
    // checkpoints go on.
    assert_eq!(h.apply(&range("a")), Ok(()));
    h.apply(&txn(vec![range("a"), del("b", "")], vec![range("b")]))
        .unwrap();
    assert_eq!(value_of(&h.store, "b"), None);
    h.apply(&del("a", "")).unwrap();
    assert_eq!(value_of(&h.store, "a"), None);
    let at = h.store.revision();
    h.at(|s, i| s.compact(i, at)).unwrap();
    while h.store.compact_step(1) {}
    h.store.check_invariants();
    h.at(|s, i| s.lease_checkpoint(i, &[(5, 3)]));
    assert_eq!(h.store.lease(5).unwrap().remaining, 3);
    assert_eq!(h.at(|s, i| s.lease_revoke(i, 5)), Ok(at + 1));
    assert_eq!(value_of(&h.store, "l"), None);
    h.store.check_invariants();

    // A CORRUPT alarm alone refuses nothing; disarming NOSPACE lets writes
    // in again.
    h.raise(2, CORRUPT);
    assert_eq!(h.apply(&put("a", "3")), Err(KvError::NoSpace));
    assert_eq!(h.disarm(1, NOSPACE).map(|a| a.member), Some(1));
    h.apply(&put("a", "3")).unwrap();
    assert_eq!(value_of(&h.store, "a"), Some(b("3")));
    assert_eq!(h.at(|s, i| s.lease_grant(i, 6, 10)), Ok(()));
}

#[test]
fn invalid_requests_are_refused_as_before_under_nospace() {
    let mut h = Harness::new();
    h.raise(1, NOSPACE);
    assert_eq!(h.apply(&put("", "v")), Err(KvError::EmptyKey));
    assert_eq!(h.apply(&del("", "")), Err(KvError::EmptyKey));
}

#[test]
fn the_error_is_etcds() {
    assert_eq!(
        KvError::NoSpace.to_string(),
        "etcdserver: mvcc: database space exceeded"
    );
    assert_eq!(KvError::NoSpace.grpc_code(), GrpcCode::ResourceExhausted);
    assert_eq!(GrpcCode::ResourceExhausted.as_i32(), 8);
}

#[test]
fn the_cost_of_a_request_is_etcds_cost_txn() {
    let per_put = VERSION_OVERHEAD_BYTES + KEY_OVERHEAD_BYTES;
    assert_eq!(write_cost(&put("ab", "cde")), 5 + per_put);
    assert_eq!(write_cost(&del("a", "z")), 0);
    assert_eq!(write_cost(&range("a")), 0);
    assert_eq!(write_cost(&RequestOp { request: None }), 0);
    assert_eq!(write_cost(&txn(vec![range("a"), del("b", "")], vec![])), 0);
    // The dearer branch.
    let t = txn(
        vec![put("a", "1"), put("b", "22")],
        vec![put("c", "1234567890")],
    );
    assert_eq!(write_cost(&t), 5 + 2 * per_put);
    let t = txn(vec![put("a", "1")], vec![put("c", "1234567890")]);
    assert_eq!(write_cost(&t), 11 + per_put);
    // Nested txns count.
    let t = txn(vec![txn(vec![], vec![put("k", "v")]), del("x", "")], vec![]);
    assert_eq!(write_cost(&t), 2 + per_put);
    assert_eq!(LEASE_COST_BYTES, 64);
}

#[test]
fn snapshots_carry_alarms() {
    let mut h = Harness::new();
    h.apply(&put("a", "1")).unwrap();
    h.raise(u64::MAX, NOSPACE);
    h.raise(2, CORRUPT);
    h.raise(2, NOSPACE);
    let bytes = snapshot_of(&h.store);
    assert_eq!(bytes[8], SNAPSHOT_VERSION);
    assert_eq!(SNAPSHOT_VERSION, 6);
    let back = read(&bytes).unwrap();
    back.check_invariants();
    assert_eq!(back, h.store);
    assert_eq!(back.alarms().collect::<Vec<_>>(), h.alarms());
    assert_eq!(snapshot_of(&back), bytes);
    assert_eq!(back.digest(), h.store.digest());

    // Alarms are state: a store that differs only in them differs.
    let mut other = read(&bytes).unwrap();
    let i = other.applied_index() + 1;
    other.alarm_deactivate(i, 2, CORRUPT);
    let mut same = read(&bytes).unwrap();
    same.mark_applied(i);
    assert_ne!(other, same);
    assert_ne!(other.digest(), same.digest());

    // A frozen view keeps the alarms it froze.
    let view = h.store.freeze();
    h.disarm(2, NOSPACE);
    let mut frozen = Vec::new();
    view.write_snapshot(&mut frozen).unwrap();
    assert_eq!(frozen, bytes);
    let now = read(&snapshot_of(&h.store)).unwrap();
    assert_eq!(now.alarms().count(), 2);
    // ... and NOSPACE is still active, from member u64::MAX.
    let mut now = now;
    let i = now.applied_index() + 1;
    assert_eq!(now.apply(i, &put("b", "2")), Err(KvError::NoSpace));
}

#[test]
fn a_v3_snapshot_is_read_as_one_without_alarms() {
    let mut h = Harness::new();
    h.apply(&put("a", "1")).unwrap();
    h.apply(&put("b", "2")).unwrap();
    h.apply(&del("a", "")).unwrap();
    assert_eq!(h.at(|s, i| s.lease_grant(i, 9, 30)), Ok(()));
    let current = snapshot_of(&h.store);
    assert_eq!(
        read(&as_v5(&current)).unwrap(),
        h.store,
        "a v5 snapshot reads back"
    );
    let v4 = as_v4(&current);
    assert_eq!(read(&v4).unwrap(), h.store, "a v4 snapshot reads back");
    // v3 = v4 without the (empty) alarm table.
    let at = v4.len() - 4 - 8;
    assert_eq!(&v4[at..at + 8], &0u64.to_le_bytes());
    let mut v3 = v4[..at].to_vec();
    v3.extend_from_slice(&[0; 4]);
    v3[8] = 3;
    reseal(&mut v3);
    let back = read(&v3).unwrap();
    back.check_invariants();
    assert_eq!(back, h.store);
    assert_eq!(back.alarms().count(), 0);
    assert!(back.lease(9).is_some());
    // Written back in the current format.
    assert_eq!(snapshot_of(&back), current);

    // A v3 snapshot with an alarm table appended is not a v3 snapshot.
    let mut longer = v3.clone();
    let n = longer.len() - 4;
    longer.splice(n..n, 0u64.to_le_bytes());
    reseal(&mut longer);
    assert!(read(&longer).is_err());
    // Nor is a v4 snapshot without one.
    let mut shorter = v3.clone();
    shorter[8] = 4;
    reseal(&mut shorter);
    assert!(read(&shorter).is_err());
}

#[test]
fn forged_alarm_tables_are_refused() {
    let mut h = Harness::new();
    h.apply(&put("k", "v")).unwrap();
    h.raise(5, NOSPACE);
    h.raise(9, CORRUPT);
    let good = snapshot_of(&h.store);
    read(&good).unwrap();
    let count = alarm_count_at(&good, 2);
    assert_eq!(&good[count..count + 8], &2u64.to_le_bytes());
    let alarm_at = move |i: usize| count + 8 + 9 * i;
    assert_eq!(&good[alarm_at(0)..alarm_at(0) + 8], &5u64.to_le_bytes());
    assert_eq!(good[alarm_at(0) + 8], 1);
    assert_eq!(good[alarm_at(1) + 8], 2);

    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("kind 0 (NONE)", Box::new(move |s| s[alarm_at(0) + 8] = 0)),
        (
            "kind 3 (unknown)",
            Box::new(move |s| s[alarm_at(1) + 8] = 3),
        ),
        (
            "not ascending",
            Box::new(move |s| s[alarm_at(1)..alarm_at(1) + 8].copy_from_slice(&4u64.to_le_bytes())),
        ),
        (
            "a duplicate",
            Box::new(move |s| {
                s[alarm_at(1)..alarm_at(1) + 8].copy_from_slice(&5u64.to_le_bytes());
                s[alarm_at(1) + 8] = 1;
            }),
        ),
        (
            "count over the table",
            Box::new(move |s| s[count..count + 8].copy_from_slice(&3u64.to_le_bytes())),
        ),
        (
            "count under the table",
            Box::new(move |s| s[count..count + 8].copy_from_slice(&1u64.to_le_bytes())),
        ),
        (
            "a huge count",
            Box::new(move |s| s[count..count + 8].copy_from_slice(&u64::MAX.to_le_bytes())),
        ),
        ("version 7", Box::new(|s| s[8] = 7)),
    ];
    for (what, edit) in edits {
        let mut bytes = good.clone();
        edit(&mut bytes);
        reseal(&mut bytes);
        assert!(read(&bytes).is_err(), "{what}: read back");
        let mut bytes = good.clone();
        edit(&mut bytes);
        assert!(read(&bytes).is_err(), "{what}: read back unsealed");
    }
    // A valid edit reads back: member 9's CORRUPT becomes NOSPACE.
    let mut bytes = good.clone();
    bytes[alarm_at(1) + 8] = 1;
    reseal(&mut bytes);
    let back = read(&bytes).unwrap();
    assert_eq!(
        back.alarms().collect::<Vec<_>>(),
        [
            Alarm {
                member: 5,
                kind: NOSPACE
            },
            Alarm {
                member: 9,
                kind: NOSPACE
            }
        ]
    );
    for n in 0..good.len() {
        assert!(read(&good[..n]).is_err(), "truncated at {n}");
    }
}

// ---------------------------------------------------------------------------
// The state machine

fn encoded(cmd: &KvCommand) -> Bytes {
    let mut b = BytesMut::new();
    KvMachine::encode_command(cmd, &mut b);
    b.freeze()
}

fn alarm_cmd(activate: bool, member: u64, kind: AlarmKind) -> KvCommand {
    KvCommand::Alarm {
        activate,
        member,
        kind,
    }
}

/// Applies `cmds` from log index `first`; returns the responses.
fn apply(m: &mut KvMachine, first: u64, cmds: &[KvCommand]) -> Vec<Result<KvResponse, KvError>> {
    let batch: Vec<Committed> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| Committed {
            index: first + i as u64,
            term: 1,
            command: Some(encoded(c)),
        })
        .collect();
    let mut out = Vec::new();
    m.apply(&batch, &mut out).unwrap();
    out
}

fn alarms_of(m: &KvMachine) -> Vec<Alarm> {
    match m.query(&KvQuery::Alarms) {
        KvQueryResponse::Alarms(a) => a,
        other => panic!("{other:?}"),
    }
}

#[test]
fn alarm_commands_round_trip_and_bad_ones_are_refused() {
    for cmd in [
        alarm_cmd(true, 1, NOSPACE),
        alarm_cmd(false, u64::MAX, CORRUPT),
    ] {
        let bytes = encoded(&cmd);
        assert_eq!(bytes[0], TAG_ALARM);
        assert_eq!(bytes.len(), 11);
        assert_eq!(decode_command(bytes.clone()).unwrap(), cmd);
        assert!(KvMachine::check_command(&bytes).is_ok());
    }
    let good = encoded(&alarm_cmd(true, 1, NOSPACE)).to_vec();
    let mut bad = Vec::new();
    for (at, byte) in [(1, 0u8), (1, 3), (10, 0), (10, 3)] {
        let mut b = good.clone();
        b[at] = byte;
        bad.push(b);
    }
    bad.push(good[..10].to_vec());
    let mut longer = good.clone();
    longer.push(0);
    bad.push(longer);
    for b in bad {
        assert!(
            KvMachine::check_command(&Bytes::from(b.clone())).is_err(),
            "{b:?}"
        );
    }
}

#[test]
fn alarms_through_apply_and_the_quota_the_api_reads() {
    let mut m = KvMachine::with_quota(10_000);
    let quota: std::sync::Arc<Quota> = m.quota().clone();
    assert_eq!(quota.limit(), 10_000);
    assert_eq!(quota.bytes(), 0);
    let out = apply(
        &mut m,
        1,
        &[
            KvCommand::Op(put("a", &"x".repeat(1000))),
            alarm_cmd(true, 2, NOSPACE),
            alarm_cmd(true, 2, NOSPACE),
            KvCommand::Op(put("b", "1")),
            KvCommand::LeaseGrant { id: 1, ttl: 10 },
            KvCommand::Op(del("a", "")),
        ],
    );
    let nospace = Alarm {
        member: 2,
        kind: NOSPACE,
    };
    assert!(matches!(out[0], Ok(KvResponse::Op(_))));
    assert_eq!(out[1], Ok(KvResponse::Alarm(Some(nospace))));
    assert_eq!(out[2], Ok(KvResponse::Alarm(Some(nospace))));
    assert_eq!(out[3], Err(KvError::NoSpace));
    assert_eq!(out[4], Err(KvError::NoSpace));
    assert!(matches!(out[5], Ok(KvResponse::Op(_))));
    assert_eq!(alarms_of(&m), [nospace]);
    assert!(quota.nospace());
    assert_eq!(quota.bytes(), m.store().approx_bytes());
    assert!(quota.bytes() > 1000);
    // What the API asks before proposing.
    assert_eq!(quota.check(0), QuotaCheck::Fits);
    assert_eq!(quota.check(1), QuotaCheck::Alarmed);

    let out = apply(
        &mut m,
        7,
        &[
            alarm_cmd(false, 3, NOSPACE),
            alarm_cmd(false, 2, NOSPACE),
            KvCommand::Op(put("b", "1")),
        ],
    );
    assert_eq!(out[0], Ok(KvResponse::Alarm(None)));
    assert_eq!(out[1], Ok(KvResponse::Alarm(Some(nospace))));
    assert!(matches!(out[2], Ok(KvResponse::Op(_))));
    assert!(!quota.nospace());
    assert_eq!(alarms_of(&m), []);
    let bytes = quota.bytes();
    assert_eq!(quota.check(10_000 - bytes), QuotaCheck::Fits);
    assert_eq!(quota.check(10_000 - bytes + 1), QuotaCheck::Exceeds);
    // One raise at a time.
    assert!(quota.begin_raise());
    assert!(!quota.begin_raise());
    quota.raised();
    assert!(quota.begin_raise());
    quota.raised();

    // Compaction frees space: the quota hears of it as the slices run.
    let revision = m.store().revision();
    let out = apply(&mut m, 10, &[KvCommand::Compact { revision }]);
    assert!(out[0].is_ok());
    while m.background_step() {}
    assert!(quota.bytes() < bytes, "{} < {bytes}", quota.bytes());
    assert_eq!(quota.bytes(), m.store().approx_bytes());
}

#[test]
fn snapshot_round_trip_and_install_keep_alarms_and_the_quota() {
    let mut m = KvMachine::with_quota(1 << 20);
    apply(
        &mut m,
        1,
        &[
            KvCommand::Op(put("a", "1")),
            alarm_cmd(true, 3, NOSPACE),
            alarm_cmd(true, 1, CORRUPT),
        ],
    );
    let mut bytes = Vec::new();
    m.snapshot().write_to(&mut bytes).unwrap();
    let restored = KvMachine::restore(&mut &bytes[..]).unwrap();
    assert_eq!(restored.store(), m.store());
    assert_eq!(alarms_of(&restored), alarms_of(&m));

    // A fresh member with its own quota installs it: the alarms are
    // state, the quota is the member's.
    let mut fresh = KvMachine::with_quota(12_345);
    let quota = fresh.quota().clone();
    assert!(!quota.nospace());
    drop(fresh.install(restored));
    assert_eq!(fresh.quota().limit(), 12_345);
    assert!(quota.nospace(), "install tells the quota");
    assert_eq!(quota.bytes(), fresh.store().approx_bytes());
    assert_eq!(alarms_of(&fresh).len(), 2);
    let out = apply(&mut fresh, 4, &[KvCommand::Op(put("b", "2"))]);
    assert_eq!(out[0], Err(KvError::NoSpace));
}

#[test]
fn the_default_quota_is_etcds() {
    assert_eq!(QUOTA_BYTES_DEFAULT, 2 * 1024 * 1024 * 1024);
    assert_eq!(Quota::new(0).limit(), QUOTA_BYTES_DEFAULT);
    assert_eq!(KvMachine::new().quota().limit(), QUOTA_BYTES_DEFAULT);
    assert_eq!(
        skiff_kv::server::KvOptions::default().quota_backend_bytes,
        QUOTA_BYTES_DEFAULT
    );
    let none = Quota::new(u64::MAX);
    assert_eq!(none.check(u64::MAX), QuotaCheck::Fits);
}
