//! skiff-examples: services that embed the Skiff runtime (`skiff-node`)
//! with a state machine of their own, written as a user of the crate
//! would write them.
//!
//! * [`lock_table`]: a replicated lock table with fencing tokens (its
//!   command and snapshot formats, deterministic apply);
//! * [`scenario`]: a 3-member cluster in one process running concurrent
//!   clients, a member stopped and restarted, and the checks. Run it with
//!   `cargo run -p skiff-examples --example lock_table`; `cargo test -p
//!   skiff-examples` runs it too.

pub mod lock_table;
pub mod scenario;
