//! Helpers shared by the integration tests: local runtimes with or without a ring, a PRNG.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;

/// Run `f` on a current-thread runtime inside a `LocalSet`, like a blockd I/O thread; with
/// `entries` the thread gets a ring first.
pub fn run_local<F, Fut>(entries: Option<u32>, f: F) -> Fut::Output
where
    F: FnOnce() -> Fut,
    Fut: Future,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        if let Some(entries) = entries {
            aio::init_thread(entries).unwrap();
            assert_eq!(aio::thread_has_ring(), aio::uring_available());
        }
        f().await
    })
}

/// xorshift64*: deterministic, dependency-free randomness for workloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
