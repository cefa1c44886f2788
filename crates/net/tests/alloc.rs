//! What a forged body can make the codec allocate: counts read from the wire
//! are bounded by the bytes left before anything is allocated for them, so
//! a peer can never make a receiver allocate more than a small multiple of
//! what it actually sent.
//!
//! This test binary counts the bytes each thread allocates (its own global
//! allocator, hence its own file).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes, BytesMut};
use skiff_net::{decode_messages, WireError};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: touching it from the
    // allocator neither allocates nor fails during thread teardown.
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// only addition is a thread-local counter that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which
        // is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size));
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s
        // contract on `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes this thread allocated while running `f`.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let out = f();
    (out, ALLOCATED.with(Cell::get) - before)
}

/// A body of one Append claiming `count` entries, followed by `fill` zero
/// bytes.
fn append_claiming(count: u32, fill: usize) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32_le(1); // one message
    b.put_u8(5); // Append
    b.put_bytes(0, 24); // from, to, term
    b.put_bytes(0, 24); // prev_index, prev_term, commit
    b.put_u32_le(count); // entries
    b.put_bytes(0, fill);
    b.freeze()
}

/// Every entry takes at least 17 bytes (index, term, kind).
const ENTRY_BYTES_MIN: usize = 17;

#[test]
fn a_forged_entry_count_allocates_nothing_for_its_entries() {
    // 16 bytes after the count: not even one entry fits, so the count is
    // refused before anything is allocated for it.
    let body = append_claiming(u32::MAX, 16);
    let (result, bytes) = allocated_by(|| decode_messages(&body));
    assert!(matches!(result, Err(WireError::Truncated { .. })));
    assert!(
        bytes < 4096,
        "allocated {bytes} bytes for a {}-byte body",
        body.len()
    );

    // 1 MiB after the count, and a count of four billion, or of one entry
    // per byte: more than the bytes can hold, refused as soon as read.
    for count in [u32::MAX, 1 << 20, (1 << 20) / ENTRY_BYTES_MIN as u32 + 1] {
        let body = append_claiming(count, 1 << 20);
        let (result, bytes) = allocated_by(|| decode_messages(&body));
        assert!(
            matches!(result, Err(WireError::Truncated { .. })),
            "count {count}"
        );
        assert!(bytes < 4096, "count {count}: allocated {bytes} bytes");
    }
}

#[test]
fn what_a_body_makes_the_decoder_allocate_is_proportional_to_it() {
    // A count the bytes could hold, but entries that do not decode (payload
    // kind 0): up to one `Entry` per 17 bytes may have been reserved — a
    // bounded multiple of the body, never of the count.
    let body = append_claiming(((1 << 20) / ENTRY_BYTES_MIN) as u32, 1 << 20);
    let (result, bytes) = allocated_by(|| decode_messages(&body));
    assert!(matches!(result, Err(WireError::UnknownTag { .. })));
    assert!(
        bytes <= 8 * body.len(),
        "allocated {bytes} bytes for a {}-byte body",
        body.len()
    );
}
