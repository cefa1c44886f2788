//! skiff-raft: the Raft state machine, with no I/O, no clock and no threads.
//!
//! This crate owns the consensus rules (election with pre-vote, pipelined
//! replication, snapshots, membership, reads, leadership transfer). It must
//! never touch files, sockets or the system clock: time enters as ticks and
//! randomness as a seeded RNG. Its contents land with the skiff-raft issue.
