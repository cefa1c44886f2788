//! A replicated lock table embedded in a service: what it shows and how to
//! run it.
//!
//! The service brings its own state machine ([`skiff_examples::lock_table`]:
//! acquire / release with fencing tokens, hand-written little-endian
//! commands, a CRC-checked snapshot format) and runs it on the Skiff
//! runtime. This program starts 3 members in one process (real WAL files
//! in a temporary directory, real TCP on loopback), runs concurrent clients
//! against every member (followers forward writes to the leader), checks
//! that no lock was ever granted to two owners at once and that fencing
//! tokens only grow, then stops a follower, moves the others on past a few
//! snapshots, restarts it and checks its table equals the others'. It
//! exits non-zero on any mismatch.
//!
//! ```sh
//! cargo run --release -p skiff-examples --example lock_table
//! cargo run -p skiff-examples --example lock_table -- --clients 12 --rounds 200
//! ```
//!
//! `cargo test -p skiff-examples` runs the same scenario (tests/lock_table.rs).

use skiff_examples::scenario::{run, Options};

fn main() {
    let mut opts = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| -> usize {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{name} takes a number")))
        };
        match flag.as_str() {
            "--clients" => opts.clients = value("--clients").max(1),
            "--rounds" => opts.rounds = value("--rounds"),
            "--locks" => opts.locks = value("--locks").max(1),
            "--snapshot-entries" => {
                opts.snapshot_entries = value("--snapshot-entries").max(4) as u64
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    match run(&opts) {
        Ok(r) => {
            println!(
                "ok: {} grants, {} acquires found the lock held, {} commands from {} clients; \
                 snapshots taken per member {:?}; node {} restarted and caught up \
                 ({} snapshot(s) installed); {:.1} s",
                r.grants,
                r.held_by_other,
                r.commands,
                opts.clients,
                r.snapshots_taken,
                r.restarted,
                r.restarted_installed,
                r.elapsed.as_secs_f64()
            );
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "{why}\nusage: lock_table [--clients N] [--rounds N] [--locks N] [--snapshot-entries N]"
    );
    std::process::exit(2);
}
