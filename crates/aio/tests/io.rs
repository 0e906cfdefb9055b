//! ImageFile I/O on an I/O-thread-like runtime: with a ring, O_DIRECT,
//! the thread-pool fallback, cancelled and leaked futures, and the sparse-file operations.

mod common;

use aio::{ImageFile, IoBuf, OpenOptions};
use common::{run_local, Rng};
use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::task::Poll;

const REGION: u64 = 256 << 10;
const TASKS: u64 = 16;

async fn new_file(dir: &tempfile::TempDir, name: &str, len: u64, direct: bool) -> ImageFile {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    OpenOptions::new(&path)
        .writable(true)
        .direct(direct)
        .open()
        .await
        .unwrap()
}

/// Several local tasks each do random-sized reads and writes inside their own region, so
/// requests of different tasks overlap in time; every read is checked against the model.
async fn random_workload(file: Rc<ImageFile>, aligned: bool, seed: u64) {
    let model = Rc::new(RefCell::new(vec![0u8; (REGION * TASKS) as usize]));
    let align = if aligned { 4096 } else { 1 };
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let file = Rc::clone(&file);
        let model = Rc::clone(&model);
        tasks.push(tokio::task::spawn_local(async move {
            let mut rng = Rng::new(seed + t);
            let base = t * REGION;
            for _ in 0..40 {
                let len = (1 + rng.below(64 << 10)).div_ceil(align) * align;
                let off = rng.below(REGION - len) / align * align;
                let range = (base + off) as usize..(base + off + len) as usize;
                if rng.below(2) == 0 {
                    let mut data = vec![0u8; len as usize];
                    rng.fill(&mut data);
                    file.write_at(&data, base + off).await.unwrap();
                    model.borrow_mut()[range].copy_from_slice(&data);
                } else {
                    let mut data = vec![0xeeu8; len as usize];
                    file.read_at(&mut data, base + off).await.unwrap();
                    assert!(data == model.borrow()[range], "read mismatch at {off}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut all = vec![0u8; (REGION * TASKS) as usize];
    file.read_at(&mut all, 0).await.unwrap();
    assert!(all == *model.borrow());
}

#[test]
fn concurrent_random_io_with_ring() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(32), || async {
        let file = new_file(&dir, "img", REGION * TASKS, false).await;
        random_workload(Rc::new(file), false, 1).await;
    });
}

#[test]
fn concurrent_random_io_direct_aligned_and_unaligned() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(64), || async {
        let file = new_file(&dir, "img", REGION * TASKS, true).await;
        assert!(file.is_direct());
        assert!(file.request_alignment() >= 512);
        let file = Rc::new(file);
        random_workload(Rc::clone(&file), true, 2).await;
        let file = new_file(&dir, "img2", REGION * TASKS, true).await;
        random_workload(Rc::new(file), false, 3).await;
    });
}

/// As `random_workload`, through `read_buf`/`write_buf` with each buffer split at a random
/// point into two pieces in flight at once: with O_DIRECT an aligned piece goes to the
/// kernel in place and an unaligned one through a bounce buffer, and both must land.
async fn random_owned_workload(file: Rc<ImageFile>, seed: u64) {
    let len_total = (REGION * TASKS) as usize;
    let mut model = vec![0u8; len_total];
    file.read_at(&mut model, 0).await.unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..200 {
        // Every other request page-aligned in offset, length and cut.
        let align = if i % 2 == 0 { 4096 } else { 1 };
        let len = (1 + rng.below(64 << 10) as usize).div_ceil(align) * align;
        let off = rng.below(len_total as u64 - len as u64) / align as u64 * align as u64;
        let range = off as usize..off as usize + len;
        let cut = rng.below(len as u64 + 1) as usize / align * align;
        let mut buf = IoBuf::new(len).unwrap();
        let mut head = buf.split_to(cut);
        let tail_off = off + cut as u64;
        if rng.below(2) == 0 {
            rng.fill(head.as_mut_slice());
            rng.fill(buf.as_mut_slice());
            let (head, tail) =
                futures::join!(file.write_buf(head, off), file.write_buf(buf, tail_off));
            let (mut head, tail) = (head.unwrap(), tail.unwrap());
            head.unsplit(tail).unwrap();
            assert_eq!(head.len(), len);
            model[range].copy_from_slice(head.as_slice());
        } else {
            head.as_mut_slice().fill(0xee);
            buf.as_mut_slice().fill(0xee);
            let (head, tail) =
                futures::join!(file.read_buf(head, off), file.read_buf(buf, tail_off));
            let (mut head, tail) = (head.unwrap(), tail.unwrap());
            head.unsplit(tail).unwrap();
            assert!(
                head.as_slice() == &model[range],
                "read mismatch at {off}+{len} cut {cut}"
            );
        }
    }
    let mut all = vec![0u8; len_total];
    file.read_at(&mut all, 0).await.unwrap();
    assert!(all == model);
}

#[test]
fn owned_buffers_in_pieces_land_in_place_or_through_a_bounce() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(64), || async {
        let file = new_file(&dir, "img", REGION * TASKS, true).await;
        random_owned_workload(Rc::new(file), 11).await;
        let file = new_file(&dir, "img2", REGION * TASKS, false).await;
        random_owned_workload(Rc::new(file), 12).await;
    });
    run_local(None, || async {
        let file = new_file(&dir, "img3", REGION * TASKS, true).await;
        random_owned_workload(Rc::new(file), 13).await;
    });
}

#[test]
fn fallback_without_ring() {
    let dir = tempfile::tempdir().unwrap();
    run_local(None, || async {
        assert!(!aio::thread_has_ring());
        let file = new_file(&dir, "img", REGION * TASKS, false).await;
        random_workload(Rc::new(file), false, 4).await;
        let file = new_file(&dir, "img2", REGION * TASKS, true).await;
        random_workload(Rc::new(file), true, 5).await;
    });
}

#[test]
fn fallback_outside_any_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let file = rt
        .block_on(OpenOptions::new(&path).create(true).open())
        .unwrap();
    drop(rt);
    // Polled by a hand-made executor-free wait: the futures complete on first poll.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut fut = std::pin::pin!(file.write_at(b"hello", 3));
    assert!(matches!(
        fut.as_mut().poll(&mut cx),
        std::task::Poll::Ready(Ok(()))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"\0\0\0hello");
}

#[test]
fn more_requests_than_ring_entries() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(2), || async {
        let file = Rc::new(new_file(&dir, "img", 1 << 20, false).await);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let file = Rc::clone(&file);
            tasks.push(tokio::task::spawn_local(async move {
                let data = vec![i as u8; 4096];
                file.write_at(&data, i * 4096).await.unwrap();
                let mut back = vec![0u8; 4096];
                file.read_at(&mut back, i * 4096).await.unwrap();
                assert_eq!(back, data);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn reads_past_end_of_file_are_zero() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [false, true] {
        run_local(Some(8), || async {
            let path = dir.path().join(format!("short{direct}"));
            std::fs::write(&path, vec![7u8; 6000]).unwrap();
            let file = OpenOptions::new(&path).direct(direct).open().await.unwrap();
            assert_eq!(file.size().unwrap(), 6000);
            let mut buf = vec![0xffu8; 16384];
            file.read_at(&mut buf, 0).await.unwrap();
            assert!(buf[..6000].iter().all(|&b| b == 7));
            assert!(buf[6000..].iter().all(|&b| b == 0));
        });
    }
}

/// Poll `fut` `polls` times, letting other tasks (the reaper) run in between, then drop it.
async fn poll_then_drop<F: Future>(fut: F, polls: u64) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..polls {
        let polled = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
        if let Poll::Ready(out) = polled {
            return Some(out);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Drop read and write futures while their requests are queued, submitted or done but
/// uncollected, many times, interleaved with checked I/O: no crash, no corruption, and
/// every dropped write still lands completely once settled (a started request is never
/// abandoned half-way).
fn cancellation_rounds(entries: Option<u32>, direct: bool, min_dropped: u32) {
    let dir = tempfile::tempdir().unwrap();
    run_local(entries, || async {
        let file = new_file(&dir, "img", 8 << 20, direct).await;
        let mut rng = Rng::new(9);
        let mut model = vec![0u8; 8 << 20];
        let mut dropped = 0;
        for round in 0..300u64 {
            let off = rng.below(2000) * 4096;
            let len = (1 + rng.below(64)) as usize * 4096;
            {
                let mut victim = vec![0u8; len];
                poll_then_drop(file.read_at(&mut victim, off), rng.below(3) + 1).await;
            }
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            if poll_then_drop(file.write_at(&data, off), rng.below(3) + 1)
                .await
                .is_none()
            {
                dropped += 1;
            }
            file.settle_writes().await;
            let mut back = vec![0u8; len];
            file.read_at(&mut back, off).await.unwrap();
            assert!(back == data, "write lost in round {round}");
            model[off as usize..off as usize + len].copy_from_slice(&data);
            if round % 50 == 0 {
                let mut all = vec![0u8; 8 << 20];
                file.read_at(&mut all, 0).await.unwrap();
                assert!(all == model);
            }
        }
        assert!(
            dropped >= min_dropped,
            "only {dropped} futures dropped before completion"
        );
    });
}

#[test]
fn cancelled_futures_with_ring() {
    cancellation_rounds(Some(16), false, 80);
}

#[test]
fn cancelled_futures_with_ring_direct() {
    cancellation_rounds(Some(16), true, 80);
}

#[test]
fn cancelled_futures_with_fallback() {
    // A pool thread may finish a request before its future's first poll returns (the
    // runtime thread being preempted right after spawning it), so how many futures get
    // dropped unfinished depends on machine load; the data checks still apply to all.
    cancellation_rounds(None, false, 0);
}

#[test]
fn runtime_dropped_with_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
    for _ in 0..20 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        let path = path.clone();
        local.block_on(&rt, async move {
            aio::init_thread(16).unwrap();
            let file = Rc::new(OpenOptions::new(&path).writable(true).open().await.unwrap());
            for i in 0..8u64 {
                let file = Rc::clone(&file);
                tokio::task::spawn_local(async move {
                    let mut buf = vec![0u8; 512 << 10];
                    file.read_at(&mut buf, i * (512 << 10)).await.unwrap();
                    file.write_at(&buf, i * (512 << 10)).await.unwrap();
                });
            }
            tokio::task::yield_now().await;
        });
        drop(local);
        drop(rt);
        assert!(!aio::thread_has_ring());
    }
    assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 4 << 20]);
}

/// Large writes to a tmpfs file go through the file's one pool writer (`op.rs`). However the
/// writes before ended, the file must never believe a writer still runs when none does: the
/// next writes would wait forever. Many concurrent writes through it must all land, each
/// where it was aimed.
#[test]
fn tmpfs_writer_survives_a_dropped_runtime_and_lands_every_write() {
    const MIB: usize = 1 << 20;
    const WRITES: usize = 16;
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed here");
    let path = dir.path().join("img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len((WRITES * MIB) as u64)
        .unwrap();
    // One file across runtimes, so the state of its writer carries from one to the next.
    let file = Rc::new(run_local(None, || async {
        OpenOptions::new(&path)
            .writable(true)
            .direct(true)
            .open()
            .await
            .unwrap()
    }));
    // Runtimes dropped with writes queued or in flight, as an I/O thread ending would.
    for round in 0..10u8 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            aio::init_thread(16).unwrap();
            for i in 0..WRITES {
                let file = Rc::clone(&file);
                tokio::task::spawn_local(async move {
                    let mut buf = IoBuf::new(MIB).unwrap();
                    buf.as_mut_slice().fill(round);
                    let _ = file.write_buf(buf, (i * MIB) as u64).await;
                });
            }
            for _ in 0..=round {
                tokio::task::yield_now().await;
            }
        });
        drop(local);
        drop(rt);
    }
    run_local(Some(16), || async {
        let writes = (0..WRITES).map(|i| {
            let file = Rc::clone(&file);
            async move {
                let mut buf = IoBuf::new(MIB).unwrap();
                buf.as_mut_slice().fill(0x40 + i as u8);
                file.write_buf(buf, (i * MIB) as u64).await.unwrap();
            }
        });
        let all = futures::future::join_all(writes);
        tokio::time::timeout(std::time::Duration::from_secs(30), all)
            .await
            .expect("large tmpfs writes never completed: the file's writer was lost");
        let mut back = vec![0u8; WRITES * MIB];
        file.read_at(&mut back, 0).await.unwrap();
        for (i, piece) in back.chunks(MIB).enumerate() {
            assert!(
                piece.iter().all(|&b| b == 0x40 + i as u8),
                "MiB {i} does not hold its write"
            );
        }
    });
}

#[test]
fn init_thread_twice_is_refused() {
    run_local(Some(4), || async {
        if aio::uring_available() {
            let err = aio::init_thread(4).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        }
        assert!(aio::init_thread(0).is_err());
    });
}

#[test]
fn zeroes_discard_block_status_and_size() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(16), || async {
        let path = dir.path().join("sparse");
        let file = OpenOptions::new(&path).create(true).open().await.unwrap();
        assert!(file.is_writable());
        file.truncate(4 << 20).await.unwrap();
        assert_eq!(file.size().unwrap(), 4 << 20);
        assert_eq!(file.block_status(0, 4 << 20).unwrap(), (false, 4 << 20));

        file.write_at(&vec![0x55u8; 1 << 20], 1 << 20)
            .await
            .unwrap();
        file.flush().await.unwrap();
        assert_eq!(file.block_status(0, 4 << 20).unwrap(), (false, 1 << 20));
        assert_eq!(
            file.block_status(1 << 20, 4 << 20).unwrap(),
            (true, 1 << 20)
        );
        assert_eq!(file.block_status(3 << 20, 100).unwrap(), (false, 100));
        assert!(file.allocated_size().unwrap() >= 1 << 20);

        // Punching zeroes (may_unmap) deallocates.
        file.write_zeroes(1 << 20, 256 << 10, true).await.unwrap();
        assert_eq!(
            file.block_status(1 << 20, 1 << 20).unwrap(),
            (false, 256 << 10)
        );
        // Zeroing without unmap allocates (ext4 makes unwritten extents, which read as
        // zeroes and which SEEK_DATA counts as holes).
        let before = file.allocated_size().unwrap();
        file.write_zeroes(2560 << 10, 256 << 10, false)
            .await
            .unwrap();
        assert!(file.allocated_size().unwrap() >= before + (256 << 10));
        // Unaligned zeroing and zeroing past the end grow the file.
        file.write_zeroes((4 << 20) - 10, 1000, true).await.unwrap();
        assert_eq!(file.size().unwrap(), (4 << 20) + 990);
        file.write_zeroes(5 << 20, 100, false).await.unwrap();
        assert_eq!(file.size().unwrap(), (5 << 20) + 100);

        file.discard((1 << 20) + (512 << 10), 512 << 10)
            .await
            .unwrap();
        let mut buf = vec![0xffu8; 1 << 20];
        file.read_at(&mut buf, 1 << 20).await.unwrap();
        assert!(buf[..256 << 10].iter().all(|&x| x == 0));
        assert!(buf[256 << 10..512 << 10].iter().all(|&x| x == 0x55));
        assert!(buf[512 << 10..].iter().all(|&x| x == 0 || x == 0x55));
        assert_eq!(
            file.block_status((1 << 20) + (512 << 10), 1 << 20).unwrap(),
            (false, 1 << 20),
            "ext4 punches the discarded range, the hole after it continues the run"
        );
        assert_eq!(file.size().unwrap(), (5 << 20) + 100, "discard keeps size");

        file.truncate(1000).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1000);
    });
}

#[test]
fn open_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(4), || async {
        let err = OpenOptions::new(dir.path().join("missing"))
            .open()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    });
}

/// A read whose future is dropped while the kernel transfers never writes into the
/// caller's memory afterwards (here refilled with a marker). O_DIRECT, because buffered
/// reads of cached data complete within the submission.
#[test]
fn dropped_reads_never_write_later() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(16), || async {
        let file = new_file(&dir, "img", 8 << 20, true).await;
        let mut rng = Rng::new(5);
        let mut data = vec![0u8; 8 << 20];
        rng.fill(&mut data);
        file.write_at(&data, 0).await.unwrap();
        let mut dropped = 0;
        for _ in 0..200 {
            let off = rng.below(1000) * 4096;
            let len = (1 + rng.below(256)) as usize * 4096;
            let mut buf = aio::pool::PoolBuf::new(len, 4096).unwrap();
            let polls = rng.below(3) + 1;
            if poll_then_drop(file.read_at(buf.as_mut_slice(), off), polls)
                .await
                .is_none()
            {
                dropped += 1;
            }
            buf.as_mut_slice().fill(0xab);
            let mut other = vec![0u8; 4096];
            file.read_at(&mut other, off).await.unwrap();
            tokio::task::yield_now().await;
            assert!(buf.as_slice().iter().all(|&b| b == 0xab), "late write");
        }
        assert!(dropped >= 50, "only {dropped} reads dropped in flight");
    });
}

/// A read future polled and then leaked (`mem::forget` is safe code) never lets the kernel
/// write into the caller's memory later: the request owns the memory the kernel fills.
/// The buffer here outlives the leak, so a late write shows as a changed marker instead of
/// a use after free. A leaked request keeps its ring slot (leaking is safe, not free), so
/// the ring here has room for every leak.
#[test]
fn leaked_reads_never_write_later() {
    let dir = tempfile::tempdir().unwrap();
    run_local(Some(64), || async {
        let file = new_file(&dir, "img", 8 << 20, true).await;
        let mut rng = Rng::new(6);
        let mut data = vec![0u8; 8 << 20];
        rng.fill(&mut data);
        file.write_at(&data, 0).await.unwrap();
        let mut leaked = 0;
        for _ in 0..32 {
            let off = rng.below(1000) * 4096;
            let len = (1 + rng.below(256)) as usize * 4096;
            let mut buf = aio::pool::PoolBuf::new(len, 4096).unwrap();
            buf.as_mut_slice().fill(0xab);
            {
                let mut read = Box::pin(file.read_at(buf.as_mut_slice(), off));
                let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
                if polled.is_pending() {
                    leaked += 1;
                    std::mem::forget(read);
                }
            }
            file.settle_writes().await;
            let mut other = vec![0u8; len];
            file.read_at(&mut other, off).await.unwrap();
            tokio::task::yield_now().await;
            assert!(buf.as_slice().iter().all(|&b| b == 0xab), "late write");
        }
        assert!(leaked >= 16, "only {leaked} reads leaked in flight");
    });
}

/// Engine::Threads keeps a file's requests off the thread's ring (QEMU's aio=threads), and
/// max_batch submits the ring's queue as soon as that many requests wait in it.
#[test]
fn engine_and_batch_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    run_local(Some(64), || async {
        if !aio::thread_has_ring() {
            panic!("io_uring is not available on this machine");
        }
        let counters = || aio::thread_ring_counters().unwrap();
        // Eight reads issued together, so that they meet in one turn of the thread.
        async fn eight_reads(file: &ImageFile) {
            let reads = (0..8u64).map(|i| async move {
                let mut buf = vec![0u8; 4096];
                file.read_at(&mut buf, i * 4096).await.unwrap();
            });
            futures::future::join_all(reads).await;
        }
        let open = |engine, batch| {
            OpenOptions::new(&path)
                .engine(engine)
                .max_batch(batch)
                .open()
        };
        let threads = open(aio::Engine::Threads, 0).await.unwrap();
        let before = counters();
        eight_reads(&threads).await;
        assert_eq!(counters(), before, "aio=threads used the ring");

        let ring = open(aio::Engine::Ring, 0).await.unwrap();
        let before = counters();
        eight_reads(&ring).await;
        let after = counters();
        assert_eq!(after.requests - before.requests, 8);
        assert_eq!(after.submissions - before.submissions, 1, "one batch");

        let one_by_one = open(aio::Engine::Ring, 1).await.unwrap();
        let before = counters();
        eight_reads(&one_by_one).await;
        let after = counters();
        assert_eq!(after.requests - before.requests, 8);
        assert_eq!(after.submissions - before.submissions, 8, "batches of one");
    });
}

/// On tmpfs, Engine::Auto (the default) sends large writes through the blocking pool,
/// where io_uring would run the writes to one file one at a time, and keeps small writes
/// and reads on the ring; an explicit Engine::Ring keeps every write on the ring.
#[test]
fn auto_engine_writes_tmpfs_files_on_the_pool() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed for this test");
    let path = dir.path().join("img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    run_local(Some(64), || async {
        if !aio::thread_has_ring() {
            panic!("io_uring is not available on this machine");
        }
        let counters = || aio::thread_ring_counters().unwrap();
        let on_ring = |before: aio::RingCounters| counters().requests - before.requests;
        let open = |engine| OpenOptions::new(&path).writable(true).engine(engine).open();
        let auto = open(aio::Engine::Auto).await.unwrap();
        let before = counters();
        auto.write_at(&[7u8; 65536], 0).await.unwrap();
        assert_eq!(on_ring(before), 0, "a large tmpfs write went to the ring");
        let mut buf = vec![0u8; 65536];
        auto.read_at(&mut buf, 0).await.unwrap();
        assert_eq!(buf, vec![7u8; 65536]);
        assert_eq!(on_ring(before), 1, "the read left the ring");
        let before = counters();
        auto.write_at(&[8u8; 4096], 0).await.unwrap();
        assert_eq!(on_ring(before), 1, "a small write left the ring");

        let ring = open(aio::Engine::Ring).await.unwrap();
        let before = counters();
        ring.write_at(&[9u8; 65536], 0).await.unwrap();
        assert_eq!(on_ring(before), 1, "aio=io_uring left the ring");
    });
}
