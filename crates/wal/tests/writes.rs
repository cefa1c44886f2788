//! How groups reach the file, on the simulated disk: every write ends on a
//! 4 KiB boundary (a group is padded with zeros so that the kernel never has
//! to read a block a write covers only in part), the padding past the log's
//! end is zeros, and the log, read live and after reopening, is exactly
//! what was appended.

use std::path::Path;

use bytes::Bytes;
use skiff_wal::sim::{Op, SimStorage};
use skiff_wal::{Entry, HardState};

mod common;
use common::{open_with, options, DIR};

fn entry(index: u64, len: usize) -> Entry {
    Entry {
        index,
        term: 3,
        payload: Bytes::from(
            (0..len)
                .map(|i| (index as usize + i) as u8)
                .collect::<Vec<_>>(),
        ),
    }
}

fn writes_end_on_block_boundaries(spare_segments: usize) {
    let sim = SimStorage::new();
    let wal = open_with(&sim, options(spare_segments)).unwrap();
    let mut expected = Vec::new();
    // Odd sizes, one write at a time (each its own group), past several
    // segment rotations.
    let mut index = 1;
    for round in 0..150u64 {
        let n = round % 5 + 1;
        let batch: Vec<Entry> = (index..index + n)
            .map(|i| entry(i, (i * 37 % 300) as usize + 1))
            .collect();
        index += n;
        expected.extend(batch.iter().cloned());
        wal.append(batch).unwrap().wait().unwrap();
        if round % 7 == 0 {
            let hs = HardState {
                term: 3,
                vote: 1,
                commit: index - 1,
            };
            wal.save_hard_state(hs).unwrap().wait().unwrap();
        }
    }
    let segments_before_close = sim
        .file_names(Path::new(DIR))
        .into_iter()
        .filter(|n| !n.starts_with("spare-"))
        .count();
    assert!(
        segments_before_close >= 3,
        "the workload rotates segments: {segments_before_close} segment files"
    );
    assert_eq!(wal.read(1, index).unwrap(), expected);
    wal.close().unwrap();

    let mut writes = 0;
    for op in sim.ops() {
        if let Op::Write { offset, data, .. } = op {
            writes += 1;
            let end = offset + data.len() as u64;
            assert!(
                end % 4096 == 0,
                "a write of {} bytes at {offset} ends inside a 4 KiB block",
                data.len()
            );
        }
    }
    assert!(writes > 150, "every group was written: {writes} writes");

    let wal = open_with(&sim, options(spare_segments)).unwrap();
    assert_eq!(wal.read(1, index).unwrap(), expected);
    // The padding left the clean end recovery expects: appends continue.
    let more = vec![entry(index, 10)];
    wal.append(more.clone()).unwrap().wait().unwrap();
    expected.extend(more);
    assert_eq!(wal.read(1, index + 1).unwrap(), expected);
    wal.close().unwrap();
}

#[test]
fn writes_end_on_block_boundaries_with_prewriter() {
    writes_end_on_block_boundaries(1);
}

#[test]
fn writes_end_on_block_boundaries_without_prewriter() {
    writes_end_on_block_boundaries(0);
}
