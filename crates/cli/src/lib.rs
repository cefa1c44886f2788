//! The `skiff` command line's library: the closed-loop load generator
//! behind `skiff bench` (and its reports), and `skiff status`.

pub mod bench;
pub mod snapshot;
