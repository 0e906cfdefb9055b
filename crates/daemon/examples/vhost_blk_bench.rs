//! bench/run's vhost-user-blk load: reads at a fixed depth on every queue of a
//! vhost-user-blk export, through the tests' frontend (tests/common/vhost.rs), for a time;
//! prints one JSON line with the rate.
//!
//! vhost_blk_bench SOCKET QUEUES DEPTH BLOCK_SIZE read|randread SECONDS DEVICE_SIZE

#[path = "../tests/common/vhost.rs"]
#[allow(dead_code)] // the tests' frontend; this driver uses part of it
mod vhost;

use std::time::{Duration, Instant};
use vhost::{Request, VhostBlk};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 8 {
        eprintln!("usage: vhost_blk_bench SOCKET QUEUES DEPTH BLOCK_SIZE read|randread SECONDS DEVICE_SIZE");
        std::process::exit(2);
    }
    let number = |i: usize| -> u64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("not a number: {}", args[i]);
            std::process::exit(2)
        })
    };
    let (queues, depth, bs) = (number(2) as u16, number(3) as usize, number(4));
    let random = match args[5].as_str() {
        "read" => false,
        "randread" => true,
        other => {
            eprintln!("unknown pattern {other}");
            std::process::exit(2)
        }
    };
    let runtime = Duration::from_secs(number(6));
    let blocks = number(7) / bs;
    let queue_size = (depth * 3).next_power_of_two().max(4) as u16;
    let mut blk = VhostBlk::connect(args[1].as_ref(), queues, queue_size, bs + 4096, true)
        .unwrap_or_else(|e| {
            eprintln!("connect {}: {e}", args[1]);
            std::process::exit(1)
        });
    // Sequential readers start spread over the device, one region per queue and slot.
    let streams = u64::from(queues) * depth as u64;
    let mut next: Vec<u64> = (0..streams).map(|i| i * (blocks / streams)).collect();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut pick = |stream: usize| -> u64 {
        if random {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % blocks
        } else {
            let block = next[stream] % blocks;
            next[stream] += 1;
            block
        }
    };
    let mut request = |q: usize, slot: usize| Request {
        kind: VIRTIO_BLK_T_IN,
        sector: pick(q * depth + slot) * bs / 512,
        out: Vec::new(),
        in_len: bs as usize,
    };
    for q in 0..usize::from(queues) {
        for slot in 0..depth {
            blk.put(q, slot, &request(q, slot));
        }
        blk.kick(q);
    }
    let start = Instant::now();
    let mut ops = 0u64;
    let mut done = Vec::new();
    while start.elapsed() < runtime {
        done.clear();
        blk.wait_any(&mut done).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        });
        let mut kicked = vec![false; usize::from(queues)];
        for &(q, slot, status) in &done {
            if status != 0 {
                eprintln!("request failed with status {status}");
                std::process::exit(1);
            }
            ops += 1;
            blk.put(q, slot, &request(q, slot));
            kicked[q] = true;
        }
        for (q, kick) in kicked.into_iter().enumerate() {
            if kick {
                blk.kick(q);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"ops\": {ops}, \"iops\": {:.0}, \"mib_s\": {:.1}}}",
        ops as f64 / secs,
        (ops * bs) as f64 / secs / (1 << 20) as f64
    );
}
