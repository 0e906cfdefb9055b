//! `null-co` / `null-aio`: a disk of a given size that stores nothing (for tests and benches).

use crate::node::{DriverInfo, Extent, ExtentKind, Node, WriteFlags};
use crate::open::{DriverEntry, Opener};
use crate::perm::Perms;
use crate::Driver;
use async_trait::async_trait;
use qapi::error::QmpError;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::io;
use std::time::Duration;

#[derive(Deserialize, Debug)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NullOptions {
    pub size: Option<u64>,
    pub latency_ns: Option<u64>,
    pub read_zeroes: Option<bool>,
}

pub struct Null {
    driver_name: &'static str,
    size: u64,
    latency: Option<Duration>,
    read_zeroes: bool,
}

/// QEMU's default null disk size.
const DEFAULT_SIZE: u64 = 1 << 30;

impl Null {
    pub fn new(driver_name: &'static str, opts: NullOptions) -> Null {
        Null {
            driver_name,
            size: opts.size.unwrap_or(DEFAULT_SIZE),
            latency: opts
                .latency_ns
                .filter(|&ns| ns > 0)
                .map(Duration::from_nanos),
            read_zeroes: opts.read_zeroes.unwrap_or(false),
        }
    }

    async fn delay(&self) {
        if let Some(latency) = self.latency {
            tokio::time::sleep(latency).await;
        }
    }
}

#[async_trait(?Send)]
impl Driver for Null {
    fn format_name(&self) -> &'static str {
        self.driver_name
    }

    fn size(&self, _node: &Node) -> u64 {
        self.size
    }

    async fn read(&self, _node: &Node, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.delay().await;
        // Without read-zeroes the content is undefined, so the buffer is left as it is.
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }

    async fn write(&self, _: &Node, _: u64, _: &[u8], _: WriteFlags) -> io::Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn write_zeroes(&self, _: &Node, _: u64, _: u64, _: WriteFlags) -> io::Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn discard(&self, _: &Node, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }

    async fn flush(&self, _: &Node) -> io::Result<()> {
        Ok(())
    }

    async fn block_status(&self, _: &Node, _offset: u64, len: u64) -> io::Result<Extent> {
        let kind = if self.read_zeroes {
            ExtentKind::Zero { allocated: true }
        } else {
            ExtentKind::Data
        };
        Ok(Extent { len, kind })
    }

    async fn truncate(&self, _: &Node, _size: u64) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTSUP))
    }

    fn child_perms(&self, _: &str, _: Perms, _: Perms, _: bool) -> (Perms, Perms) {
        (Perms::NONE, Perms::ALL)
    }

    fn info(&self, node: &Node) -> DriverInfo {
        DriverInfo {
            filename: crate::graph::json_filename(node, &format!("{}://", self.driver_name)),
            actual_size: Some(0),
            ..DriverInfo::default()
        }
    }
}

pub(crate) const DRIVER: DriverEntry = DriverEntry {
    format: false,
    hands_over: true,
    names: &["null-co", "null-aio"],
    open: |o, options| Box::pin(open(o, options)),
};

async fn open(
    o: &mut Opener<'_>,
    options: Map<String, Value>,
) -> Result<Box<dyn Driver>, QmpError> {
    let opts: NullOptions = o.parse(options)?;
    let name = if o.driver_name() == "null-co" {
        "null-co"
    } else {
        "null-aio"
    };
    Ok(Box::new(Null::new(name, opts)))
}
