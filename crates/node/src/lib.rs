//! skiff-node: the replicated KV server.
//!
//! The only crate that sees raft, wal and net together:
//!
//! * [`event_loop`]: collect inputs → `raft.step` → dispatch actions (the
//!   write path of ARCHITECTURE.md).
//! * [`kv`]: the KV state machine (an ordered map with etcd-style revisions)
//!   and its snapshots; [`command`]: how client writes travel in log entries.
//! * [`api`]: the etcd v3 gRPC services (KV, Cluster.MemberList,
//!   Maintenance.Status) on top of a running [`node::Node`].
//! * [`bench`]: the closed-loop load generator behind `skiff bench`.

pub mod api;
pub mod bench;
pub mod command;
pub mod config;
pub mod embedded;
pub mod event_loop;
pub mod kv;
pub mod metrics;
pub mod node;
pub mod storage;

/// The etcd v3 API subset, generated from `proto/` at build time.
pub mod pb {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}
