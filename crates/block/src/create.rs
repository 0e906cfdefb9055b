//! Creating new images (the short `blockd serve` form; blockdev-create builds on it later).

use imago::qcow2::Qcow2;
use imago::{FormatCreateBuilder, Storage, StorageOpenOptions};
use std::io;
use std::path::Path;

/// Create an empty qcow2 image of `size` bytes with 64 KiB clusters at `path`, which must
/// not exist yet.
///
/// imago's own file storage does blocking I/O, which is fine here: this runs before the
/// daemon serves anything.
pub async fn create_qcow2(path: &Path, size: u64) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let file =
        imago::file::File::open(StorageOpenOptions::new().filename(path).write(true)).await?;
    Qcow2::<imago::file::File>::create_builder(file)
        .size(size)
        .create()
        .await
}
