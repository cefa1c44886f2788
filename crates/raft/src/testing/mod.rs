//! Test support shared with the other crates (feature `testing`): the
//! linearizability checker and the deterministic cluster simulation.

pub mod linearizability;
pub mod sim;
