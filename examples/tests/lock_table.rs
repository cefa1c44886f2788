//! The embedding example's scenario, as CI runs it (see
//! `examples/lock_table.rs` for what it checks).

use std::time::Duration;

use skiff_examples::scenario::{run, Options};

#[test]
fn lock_table_scenario_holds() {
    let report = run(&Options::default()).unwrap_or_else(|e| panic!("{e}"));
    println!("{report:?}");
    assert!(report.grants > 0, "no lock was ever granted");
    assert!(
        report.elapsed < Duration::from_secs(30),
        "took {:?}",
        report.elapsed
    );
}
