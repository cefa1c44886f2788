//! `skiff status`: Maintenance.Status and Alarm on every endpoint, one row
//! each: role, term, commit and applied index, lag behind the leader,
//! learner flag, alarms.

use std::fmt::Write as _;
use std::time::Duration;

use super::Access;
use tokio::task::JoinSet;

use super::{connect, normalize_all, BenchError, ClientArgs};
use skiff_kv::pb::etcdserverpb::alarm_request::AlarmAction;
use skiff_kv::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use skiff_kv::pb::etcdserverpb::{AlarmRequest, AlarmType, StatusRequest};

/// Connect + call, per endpoint.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// Flags of `skiff status`.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct StatusArgs {
    /// Client endpoints, comma separated (host:port or http://host:port).
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: ClientArgs,
}

/// One member as it answered (etcd's StatusResponse fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    /// The member's id (header.member_id).
    pub member_id: u64,
    /// The leader it knows of; 0 = none.
    pub leader_id: u64,
    /// Raft term.
    pub raft_term: u64,
    /// Raft commit index (etcd's raftIndex).
    pub raft_index: u64,
    /// Applied index (etcd's raftAppliedIndex).
    pub applied_index: u64,
    /// Server version string.
    pub version: String,
    /// Errors the member reports about itself.
    pub errors: Vec<String>,
    /// A learner (receives the log, does not vote).
    pub is_learner: bool,
    /// The alarms raised for this member (NOSPACE, CORRUPT).
    pub alarms: Vec<String>,
}

impl MemberState {
    /// This member believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader_id != 0 && self.leader_id == self.member_id
    }

    fn role(&self) -> &'static str {
        if self.is_leader() {
            "leader"
        } else if self.is_learner {
            "learner"
        } else {
            "follower"
        }
    }
}

/// One row of `skiff status`: an endpoint and what it said, or why it did
/// not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// The endpoint (normalized: http://host:port).
    pub endpoint: String,
    /// The answer, or the reason there was none.
    pub reply: Result<MemberState, String>,
}

/// Calls Maintenance.Status on every endpoint concurrently, each bounded by
/// [`STATUS_TIMEOUT`]. Rows come back in the order of `endpoints`. Fails
/// only on an empty list or an endpoint that cannot be parsed.
pub async fn status(
    endpoints: &[String],
    access: &Access,
) -> Result<Vec<MemberStatus>, BenchError> {
    if endpoints.is_empty() {
        return Err(BenchError::NoEndpoints);
    }
    let endpoints = normalize_all(endpoints, &access.tls)?;
    let mut calls = JoinSet::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        let endpoint = endpoint.clone();
        let access = access.clone();
        calls.spawn(async move {
            let reply = match tokio::time::timeout(STATUS_TIMEOUT, ask(&endpoint, &access)).await {
                Ok(reply) => reply,
                Err(_) => Err(format!(
                    "no answer within {} s",
                    STATUS_TIMEOUT.as_secs_f64()
                )),
            };
            (i, MemberStatus { endpoint, reply })
        });
    }
    let mut rows: Vec<Option<MemberStatus>> = vec![None; endpoints.len()];
    while let Some(joined) = calls.join_next().await {
        let (i, row) = joined.map_err(|e| BenchError::Task(e.to_string()))?;
        rows[i] = Some(row);
    }
    Ok(rows
        .into_iter()
        .map(|row| row.expect("every call reports"))
        .collect())
}

async fn ask(endpoint: &str, access: &Access) -> Result<MemberState, String> {
    let channel = connect(endpoint, access, STATUS_TIMEOUT)
        .await
        .map_err(|e| format!("unreachable: {e}"))?;
    let mut request = tonic::Request::new(StatusRequest {});
    request.set_timeout(STATUS_TIMEOUT);
    let mut client = MaintenanceClient::new(channel);
    let reply = client
        .status(request)
        .await
        .map_err(|s| format!("Status failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let member_id = reply.header.map(|h| h.member_id).unwrap_or(0);
    let mut request = tonic::Request::new(AlarmRequest {
        action: AlarmAction::Get as i32,
        member_id,
        alarm: AlarmType::None as i32,
    });
    request.set_timeout(STATUS_TIMEOUT);
    let alarms = match client.alarm(request).await {
        Ok(r) => r
            .into_inner()
            .alarms
            .into_iter()
            .filter(|a| a.member_id == member_id)
            .map(|a| {
                AlarmType::try_from(a.alarm)
                    .map(|t| t.as_str_name().to_string())
                    .unwrap_or_else(|_| format!("alarm {}", a.alarm))
            })
            .collect(),
        Err(s) => vec![format!("alarms unknown: {}", s.message())],
    };
    Ok(MemberState {
        member_id,
        is_learner: reply.is_learner,
        alarms,
        leader_id: reply.leader,
        raft_term: reply.raft_term,
        raft_index: reply.raft_index,
        applied_index: reply.raft_applied_index,
        version: reply.version,
        errors: reply.errors,
    })
}

/// The table `skiff status` prints, ending with a summary line that scripts
/// can grep: `members=<n> reachable=<n> leader=<hex id|none>`. Member and
/// leader ids are hexadecimal, as etcdctl prints them.
pub fn format_status_table(rows: &[MemberStatus]) -> String {
    let width = rows
        .iter()
        .map(|r| r.endpoint.len())
        .max()
        .unwrap_or(0)
        .max("ENDPOINT".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>16}  {:>16}  {:>8}  {:>9}  {:>10}  {:>13}  {:>6}  {:>9}  {:>10}  ALARMS",
        "ENDPOINT",
        "MEMBER ID",
        "LEADER ID",
        "ROLE",
        "RAFT TERM",
        "RAFT INDEX",
        "APPLIED INDEX",
        "LAG",
        "IS LEADER",
        "IS LEARNER"
    );
    // Lag: entries the leader committed that the member has not applied.
    let leader_commit = rows
        .iter()
        .filter_map(|r| r.reply.as_ref().ok())
        .find(|m| m.is_leader())
        .map(|m| m.raft_index);
    for row in rows {
        match &row.reply {
            Ok(m) => {
                let _ = writeln!(
                    out,
                    "{:<width$}  {:>16x}  {:>16x}  {:>8}  {:>9}  {:>10}  {:>13}  {:>6}  {:>9}  {:>10}  {}",
                    row.endpoint,
                    m.member_id,
                    m.leader_id,
                    m.role(),
                    m.raft_term,
                    m.raft_index,
                    m.applied_index,
                    leader_commit
                        .map(|c| c.saturating_sub(m.applied_index).to_string())
                        .unwrap_or_else(|| "-".into()),
                    m.is_leader(),
                    m.is_learner,
                    if m.alarms.is_empty() {
                        "-".to_string()
                    } else {
                        m.alarms.join(",")
                    }
                );
                for err in &m.errors {
                    let _ = writeln!(out, "{:<width$}  member reports: {err}", "");
                }
            }
            Err(reason) => {
                let _ = writeln!(out, "{:<width$}  unreachable: {reason}", row.endpoint);
            }
        }
    }
    let reachable = rows.iter().filter(|r| r.reply.is_ok()).count();
    let leader = rows
        .iter()
        .filter_map(|r| r.reply.as_ref().ok())
        .find(|m| m.is_leader())
        .map(|m| format!("{:x}", m.member_id))
        .unwrap_or_else(|| "none".to_string());
    let _ = writeln!(
        out,
        "members={} reachable={reachable} leader={leader}",
        rows.len()
    );
    out
}

/// Prints [`format_status_table`] to stdout.
pub fn print_status_table(rows: &[MemberStatus]) {
    print!("{}", format_status_table(rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, leader: u64) -> MemberState {
        MemberState {
            member_id: id,
            leader_id: leader,
            raft_term: 3,
            raft_index: 42,
            applied_index: 41,
            version: "skiff".to_string(),
            errors: vec![],
            is_learner: false,
            alarms: vec![],
        }
    }

    #[test]
    fn table_has_a_row_per_member_and_a_summary() {
        let rows = vec![
            MemberStatus {
                endpoint: "http://127.0.0.1:1".to_string(),
                reply: Ok(member(0x1a, 0x1a)),
            },
            MemberStatus {
                endpoint: "http://127.0.0.1:2".to_string(),
                reply: Ok(member(2, 0x1a)),
            },
            MemberStatus {
                endpoint: "http://127.0.0.1:3".to_string(),
                reply: Err("unreachable: connection refused".to_string()),
            },
        ];
        let table = format_status_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("ENDPOINT"));
        let cols = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        let leader = cols(lines[1]);
        assert_eq!(leader[1], "1a");
        assert_eq!(leader[3], "leader");
        assert_eq!(&leader[7..], ["1", "true", "false", "-"], "{table}");
        let follower = cols(lines[2]);
        assert_eq!(follower[3], "follower");
        assert_eq!(&follower[8..], ["false", "false", "-"], "{table}");
        assert!(lines[3].contains("unreachable"));
        assert_eq!(lines[4], "members=3 reachable=2 leader=1a");
    }

    #[test]
    fn learners_lag_and_alarms_are_shown() {
        let mut learner = member(5, 0x1a);
        learner.is_learner = true;
        learner.applied_index = 30;
        learner.alarms = vec!["NOSPACE".into()];
        let rows = vec![
            MemberStatus {
                endpoint: "http://127.0.0.1:1".to_string(),
                reply: Ok(member(0x1a, 0x1a)),
            },
            MemberStatus {
                endpoint: "http://127.0.0.1:5".to_string(),
                reply: Ok(learner),
            },
        ];
        let table = format_status_table(&rows);
        let row: Vec<&str> = table.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(row[3], "learner", "{table}");
        assert_eq!(&row[7..], ["12", "false", "true", "NOSPACE"], "{table}");
    }

    #[test]
    fn no_leader_is_none() {
        let rows = vec![MemberStatus {
            endpoint: "http://h:1".to_string(),
            reply: Ok(member(1, 0)),
        }];
        assert!(format_status_table(&rows).ends_with("members=1 reachable=1 leader=none\n"));
    }
}
