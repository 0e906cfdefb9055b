//! The server judged by libnbd's tools: nbdinfo (list, map, contexts) and nbdcopy.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::{Capabilities, MetaContext};

const MIB: u64 = 1024 * 1024;

fn nbdinfo(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new("nbdinfo").arg("--json").args(args));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn nbdinfo_lists_exports_with_contexts() {
    let fx = Fixture::new(0);
    fx.export("alpha", Arc::new(MemBackend::new(MIB)));
    fx.export("beta", Arc::new(MemBackend::new(2 * MIB)));
    let uri = format!("nbd+unix://?socket={}", fx.socket.display());
    let v = nbdinfo(&["--list", &uri]);
    let exports = v["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    let beta = &exports[1];
    assert_eq!(beta["export-size"].as_u64(), Some(2 * MIB));
    assert_eq!(beta["description"].as_str(), Some("test disk"));
    assert_eq!(beta["is_read_only"].as_bool(), Some(false));
    assert_eq!(beta["can_multi_conn"].as_bool(), Some(true));
    assert_eq!(beta["can_fast_zero"].as_bool(), Some(true));
    assert_eq!(beta["block_size_maximum"].as_u64(), Some(32 * MIB));
    let ctx: Vec<&str> = beta["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        ctx,
        [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:dirty"
        ]
    );
}

fn map(uri: &str, ctx: Option<&str>) -> Vec<(u64, u64, u32)> {
    let arg = match ctx {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let v = nbdinfo(&[&arg, uri]);
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (o, l, t) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap() as u32,
        );
        match out.last_mut() {
            Some((_, ll, lt)) if *lt == t => *ll += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

#[test]
fn nbdinfo_map_matches_backend_for_every_context() {
    let fx = Fixture::new(0);
    let backing: BTreeSet<u64> = [8, 9, 30].into_iter().collect();
    let backend = Arc::new(MemBackend::with(4 * MIB, backing, Capabilities::default()));
    fx.export("disk", backend.clone());
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &fx.uri("disk"),
        "-c",
        "write -P 7 0 192k",
        "-c",
        "write -P 8 2M 64k",
        "-c",
        "write -z 3M 128k",
    ]));
    let uri = fx.uri("disk");
    let base = map(&uri, None);
    assert_eq!(base, backend.status_map(&MetaContext::BaseAllocation));
    assert!(base.len() >= 5, "{base:?}");
    let depth = map(&uri, Some("qemu:allocation-depth"));
    assert_eq!(depth, backend.status_map(&MetaContext::AllocationDepth));
    assert!(depth.iter().any(|e| e.2 == 2) && depth.iter().any(|e| e.2 == 1));
    let dirty = map(&uri, Some("qemu:dirty-bitmap:dirty"));
    assert_eq!(
        dirty,
        backend.status_map(&MetaContext::DirtyBitmap("dirty".into()))
    );
}

#[test]
fn nbdcopy_with_four_connections_both_ways() {
    let fx = Fixture::new(0);
    let size = 16 * MIB;
    let backend = Arc::new(MemBackend::new(size));
    fx.export("disk", backend.clone());
    let src = fx.path("src.raw");
    let mut image = vec![0u8; size as usize];
    for (i, chunk) in image.chunks_mut(4096).enumerate() {
        if i % 3 != 0 {
            chunk.fill((i % 250) as u8 + 1);
        }
    }
    std::fs::write(&src, &image).unwrap();
    run(Command::new("nbdcopy").args([
        "-C",
        "4",
        "--requests=16",
        "--flush",
        src.to_str().unwrap(),
        &fx.uri("disk"),
    ]));
    assert!(
        backend.contents() == image,
        "data written by nbdcopy differs"
    );
    assert!(backend.flushes() >= 1);

    let dst = fx.path("dst.raw");
    run(Command::new("nbdcopy").args(["-C", "4", &fx.uri("disk"), dst.to_str().unwrap()]));
    assert!(
        std::fs::read(&dst).unwrap() == image,
        "data read by nbdcopy differs"
    );
}
