//! skiff-kv: the etcd-compatible MVCC key-value store, run as a
//! [`skiff_node`] state machine, and its etcd v3 gRPC API.
//!
//! * [`store`]: the MVCC store (every key's versions by revision,
//!   compaction, snapshots of a frozen view, the auth state: users, roles,
//!   permissions, tokens); deterministic, no I/O;
//! * [`machine`]: the store as a [`skiff_node::StateMachine`] (its
//!   command format, queries, metrics);
//! * [`watch`]: each member's watchers: the feed from apply, the
//!   dispatcher thread, synced and catching-up watchers;
//! * [`lease`]: the lessor, the leader's clock for lease expiry;
//! * [`compactor`]: automatic compaction (etcd's `--auto-compaction-*`);
//! * [`tls`]: TLS on the client port, server and client sides;
//! * [`api`]: the etcd v3 gRPC services over a node's handle (Auth
//!   included: who asks, and what each request needs);
//! * [`server`]: a member = a node + the API; an embedded cluster of them.
//!
//! It sees `skiff-node` (and through it the Raft types it needs), never the
//! WAL or the transport.

pub mod api;
pub mod compactor;
pub mod lease;
pub mod machine;
pub mod server;
pub mod store;
pub mod tls;
pub mod watch;

/// The etcd v3 API subset, generated from `proto/` at build time.
pub mod pb {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
    }
}
