//! Creating new images: `blockd serve`'s first image and drive-backup's targets
//! (blockdev-create builds on it later).

use imago::qcow2::Qcow2;
use imago::FormatCreateBuilder;
use std::io;
use std::path::Path;

/// What a new image looks like.
pub struct NewImage<'a> {
    pub format: &'a str,
    pub size: u64,
    /// Backing file name and format written into a qcow2 header.
    pub backing: Option<(String, String)>,
}

/// Create (or overwrite) an image file. Runs on an I/O thread: the file I/O goes through
/// the aio crate, never blocking the thread.
pub async fn create_image(path: &Path, image: NewImage<'_>) -> Result<(), String> {
    let fail = |e: io::Error| format!("Could not create '{}': {e}", path.display());
    match image.format {
        "raw" => {
            if image.backing.is_some() {
                return Err("Backing file not supported for file format 'raw'".into());
            }
            let file = aio::OpenOptions::new(path)
                .create(true)
                .truncate(true)
                .open()
                .await
                .map_err(fail)?;
            file.truncate(image.size).await.map_err(fail)
        }
        "qcow2" => {
            let file = aio::OpenOptions::new(path)
                .create(true)
                .truncate(true)
                .open()
                .await
                .map_err(fail)?;
            let mut builder = Qcow2::<aio::ImageFile>::create_builder(file).size(image.size);
            if let Some((name, format)) = image.backing {
                builder = builder.backing(name, format);
            }
            builder.create().await.map_err(fail)
        }
        other => Err(format!("Driver '{other}' does not support image creation")),
    }
}
