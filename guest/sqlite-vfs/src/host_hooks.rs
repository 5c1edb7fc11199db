//! The five C functions `sqlite-wasm-rs` expects from its host, defined
//! here in the guest so they never become imports: sleep and the clock go
//! to the host's `clock`, randomness comes from a generator seeded by it
//! (SQLite needs randomness for `random()` and temporary names, never for
//! security), and there is no entropy source or local time zone.

use std::cell::Cell;

use sqlite_wasm_rs::host::{Error, LocalTime, OK};

thread_local! {
    static STATE: Cell<u64> = const { Cell::new(0) };
}

/// splitmix64, seeded from the clock on first use.
fn next() -> u64 {
    STATE.with(|s| {
        let mut x = s.get();
        if x == 0 {
            x = driver_common::clock::now().to_bits() | 1;
        }
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

pub fn fill_random(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let bytes = next().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn rust_sqlite_wasm_host_sleep(seconds: u64, nanoseconds: u32) {
    let micros = seconds
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(nanoseconds / 1000));
    driver_common::clock::sleep(micros.min(u64::from(u32::MAX)) as u32);
}

/// # Safety
/// `buf` must be valid for `len` bytes (SQLite's contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rust_sqlite_wasm_host_random(buf: *mut u8, len: usize) -> usize {
    if buf.is_null() {
        return 0;
    }
    // SAFETY: SQLite passes a buffer of `len` writable bytes.
    fill_random(unsafe { std::slice::from_raw_parts_mut(buf, len) });
    len
}

/// # Safety
/// `out` must be valid for one write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rust_sqlite_wasm_host_epoch_timestamp_in_ms(out: *mut i64) -> i32 {
    if out.is_null() {
        return Error::Unavailable as i32;
    }
    // SAFETY: SQLite passes a valid pointer.
    unsafe { *out = (driver_common::clock::now() * 1000.0) as i64 };
    OK
}

#[unsafe(no_mangle)]
pub extern "C" fn rust_sqlite_wasm_host_fill_entropy(_buf: *mut u8, _len: usize) -> i32 {
    Error::Unsupported as i32
}

#[unsafe(no_mangle)]
pub extern "C" fn rust_sqlite_wasm_host_localtime(_unix_seconds: i64, _out: *mut LocalTime) -> i32 {
    Error::Unsupported as i32
}
