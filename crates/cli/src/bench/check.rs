//! `skiff check consistency`: HashKV at one revision on every member, and
//! whether they agree.
//!
//! The revision is the current one of the first member that answers; each
//! member hashes its history through it (HashKV waits, through a ReadIndex
//! round, until the member applied that far). Members that compacted at
//! different revisions are compared only where their compact revisions are
//! equal, as etcd's corruption check does.

use std::fmt::Write as _;
use std::time::Duration;

use super::Access;

use super::{connect, normalize_all, BenchError, ClientArgs};
use skiff_kv::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use skiff_kv::pb::etcdserverpb::{HashKvRequest, StatusRequest};

/// Connect + call, per endpoint.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `skiff check consistency`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct CheckArgs {
    /// Client endpoints of every member, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: ClientArgs,
}

/// One member's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHash {
    pub member_id: u64,
    pub hash: u32,
    pub compact_revision: i64,
}

/// What `skiff check consistency` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consistency {
    /// The revision hashed.
    pub revision: i64,
    /// Per endpoint (normalized), its hash or why there is none.
    pub rows: Vec<(String, Result<MemberHash, String>)>,
}

impl Consistency {
    /// Pairs of endpoints with the same compact revision and different
    /// hashes.
    pub fn mismatches(&self) -> Vec<(&str, &str)> {
        let ok: Vec<(&str, &MemberHash)> = self
            .rows
            .iter()
            .filter_map(|(e, r)| r.as_ref().ok().map(|h| (e.as_str(), h)))
            .collect();
        let mut out = Vec::new();
        for (i, (a, ha)) in ok.iter().enumerate() {
            for (b, hb) in &ok[i + 1..] {
                if ha.compact_revision == hb.compact_revision && ha.hash != hb.hash {
                    out.push((*a, *b));
                }
            }
        }
        out
    }

    /// Every member answered and no two differ.
    pub fn consistent(&self) -> bool {
        self.rows.iter().all(|(_, r)| r.is_ok()) && self.mismatches().is_empty()
    }

    /// The report: a row per member, the differences, a verdict line.
    pub fn report(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(e, _)| e.len())
            .max()
            .unwrap_or(0)
            .max("ENDPOINT".len());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<width$}  {:>16}  {:>10}  {:>16}",
            "ENDPOINT", "MEMBER ID", "HASH", "COMPACT REVISION"
        );
        for (endpoint, row) in &self.rows {
            let _ = match row {
                Ok(h) => writeln!(
                    out,
                    "{endpoint:<width$}  {:>16x}  {:>10}  {:>16}",
                    h.member_id, h.hash, h.compact_revision
                ),
                Err(why) => writeln!(out, "{endpoint:<width$}  no hash: {why}"),
            };
        }
        for (a, b) in self.mismatches() {
            let _ = writeln!(out, "DIFFERENT: {a} and {b} at revision {}", self.revision);
        }
        let verdict = if self.consistent() {
            "consistent"
        } else if self.mismatches().is_empty() {
            "incomplete"
        } else {
            "INCONSISTENT"
        };
        let _ = writeln!(
            out,
            "revision={} members={} {verdict}",
            self.revision,
            self.rows.len()
        );
        out
    }
}

async fn client(endpoint: &str, access: &Access) -> Result<MaintenanceClient<super::Conn>, String> {
    let channel = connect(endpoint, access, CHECK_TIMEOUT)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    Ok(MaintenanceClient::new(channel))
}

async fn hash_at(endpoint: &str, access: &Access, revision: i64) -> Result<MemberHash, String> {
    let r = client(endpoint, access)
        .await?
        .hash_kv(HashKvRequest { revision })
        .await
        .map_err(|s| format!("HashKV failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(MemberHash {
        member_id: r.header.map(|h| h.member_id).unwrap_or(0),
        hash: r.hash,
        compact_revision: r.compact_revision,
    })
}

/// Hashes every member at one revision (see the module docs).
pub async fn check_consistency(
    endpoints: &[String],
    access: &Access,
) -> Result<Consistency, BenchError> {
    if endpoints.is_empty() {
        return Err(BenchError::NoEndpoints);
    }
    let endpoints = normalize_all(endpoints, &access.tls)?;
    let mut revision = None;
    let mut why = Vec::new();
    for e in &endpoints {
        let asked = async {
            client(e, access)
                .await?
                .status(StatusRequest {})
                .await
                .map_err(|s| s.message().to_string())
        };
        let status = match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
        };
        match status {
            Ok(s) => {
                revision = s.into_inner().header.map(|h| h.revision);
                break;
            }
            Err(w) => why.push(format!("{e}: {w}")),
        }
    }
    let Some(revision) = revision else {
        return Err(BenchError::Task(format!(
            "no member answered Status: {}",
            why.join("; ")
        )));
    };
    let mut calls = tokio::task::JoinSet::new();
    for (i, e) in endpoints.iter().enumerate() {
        let e = e.clone();
        let access = access.clone();
        calls.spawn(async move {
            let r = match tokio::time::timeout(CHECK_TIMEOUT, hash_at(&e, &access, revision)).await
            {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
            };
            (i, (e, r))
        });
    }
    let mut rows: Vec<Option<(String, Result<MemberHash, String>)>> = vec![None; endpoints.len()];
    while let Some(joined) = calls.join_next().await {
        let (i, row) = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        rows[i] = Some(row);
    }
    let rows = rows
        .into_iter()
        .map(|r| r.expect("every call reports"))
        .collect();
    Ok(Consistency { revision, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, hash: u32, compact: i64) -> (String, Result<MemberHash, String>) {
        (
            format!("http://m{id}"),
            Ok(MemberHash {
                member_id: id,
                hash,
                compact_revision: compact,
            }),
        )
    }

    #[test]
    fn equal_hashes_are_consistent_and_a_difference_is_named() {
        let ok = Consistency {
            revision: 9,
            rows: vec![row(1, 7, 0), row(2, 7, 0), row(3, 7, 0)],
        };
        assert!(ok.consistent());
        assert!(ok.report().ends_with("revision=9 members=3 consistent\n"));
        let bad = Consistency {
            revision: 9,
            rows: vec![row(1, 7, 0), row(2, 8, 0), row(3, 7, 0)],
        };
        assert!(!bad.consistent());
        assert_eq!(
            bad.mismatches(),
            [("http://m1", "http://m2"), ("http://m2", "http://m3")]
        );
        assert!(bad.report().contains("DIFFERENT: http://m1 and http://m2"));
        assert!(bad.report().ends_with("INCONSISTENT\n"));
        // Other compact revisions are not compared; a silent member makes
        // the check incomplete.
        let mut partial = Consistency {
            revision: 9,
            rows: vec![row(1, 7, 0), row(2, 8, 5)],
        };
        assert!(partial.mismatches().is_empty());
        partial
            .rows
            .push(("http://m3".into(), Err("unreachable".into())));
        assert!(!partial.consistent());
        assert!(partial.report().ends_with("incomplete\n"));
    }
}
