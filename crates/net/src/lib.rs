//! skiff-net: framed TCP transport between Skiff nodes.
//!
//! This crate moves bytes and messages between peers (pipelined
//! AppendEntries, coalesced frames, snapshot streaming). It must never know
//! Raft's rules. Its contents land with the skiff-net issue.
