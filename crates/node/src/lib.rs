//! skiff-node: the event loop that wires skiff-raft, skiff-wal and
//! skiff-net together, the replicated KV state machine and the client API.
//!
//! It is the only crate that sees all three. Its contents land with the
//! skiff-node issue.
