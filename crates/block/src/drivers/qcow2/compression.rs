//! The two ways a qcow2 image stores a compressed cluster (the header's compression type):
//! zlib, a raw deflate stream, and zstd, one zstd frame. Both run on whole guest clusters,
//! off the I/O thread for compression (about a millisecond per 64 KiB cluster).
//!
//! A compressed cluster's stored length is rounded up to 512-byte sectors, so the input
//! handed to `decompress` may run past the stream's end; both decoders stop where the
//! cluster is full and ignore what follows.

use super::header::Qcow2Header;
use std::cell::RefCell;
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

/// QEMU's default zstd level (ZSTD_CLEVEL_DEFAULT), which QEMU compresses clusters at.
const ZSTD_LEVEL: i32 = 3;

thread_local! {
    // A deflate stream's window and hash tables, set up once per thread, not per cluster.
    static ZLIB_COMPRESSOR: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    // A zstd context holds about a megabyte of tables: one per thread, not per cluster.
    static ZSTD_COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static ZSTD_DECODER: RefCell<Option<Decoder<'static>>> = const { RefCell::new(None) };
}

/// How this image's compressed clusters are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    /// The header's compression type; `parse` refused values other than 0 and 1.
    pub(super) fn of(header: &Qcow2Header) -> Compression {
        match header.compression_type {
            1 => Compression::Zstd,
            _ => Compression::Zlib,
        }
    }

    /// `data` (one whole cluster) compressed, or None when that does not save at least a
    /// byte: such a cluster is written plain, as QEMU does.
    pub(super) fn compress(self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() - 1);
        match self {
            Compression::Zlib => ZLIB_COMPRESSOR.with_borrow_mut(|stream| {
                // The 4 KiB window is what every qcow2 reader accepts.
                let stream = stream.get_or_insert_with(|| {
                    flate2::Compress::new_with_window_bits(
                        flate2::Compression::default(),
                        false,
                        12,
                    )
                });
                stream.reset();
                match stream.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                    Ok(flate2::Status::StreamEnd) => Some(out),
                    _ => None,
                }
            }),
            // An error here is the output not fitting in a cluster less one byte.
            Compression::Zstd => ZSTD_COMPRESSOR.with_borrow_mut(|compressor| {
                let compressor = match compressor {
                    Some(c) => c,
                    None => compressor.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?),
                };
                compressor.compress_to_buffer(data, &mut out).ok()?;
                Some(out)
            }),
        }
    }

    /// Fill `out` (one cluster) from the stream at the start of `input`. Err when the
    /// stream is damaged or holds less than a cluster; zstd also when it holds more.
    pub(crate) fn decompress(self, input: &[u8], out: &mut [u8]) -> Result<(), ()> {
        match self {
            Compression::Zlib => {
                match miniz_oxide::inflate::decompress_slice_iter_to_slice(
                    out,
                    std::iter::once(input),
                    false,
                    true,
                ) {
                    Ok(n) if n == out.len() => Ok(()),
                    // The cluster is full and the stream goes on: QEMU takes the cluster.
                    Err(miniz_oxide::inflate::TINFLStatus::HasMoreOutput) => Ok(()),
                    _ => Err(()),
                }
            }
            Compression::Zstd => zstd_frame(input, out),
        }
    }
}

/// Decode the zstd frame at the start of `input` into exactly `out`. The streaming decoder
/// is used because the sector padding after the frame is not a frame the one-shot decoder
/// would accept.
fn zstd_frame(input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    ZSTD_DECODER.with_borrow_mut(|decoder| {
        let decoder = match decoder {
            Some(d) => d,
            None => decoder.insert(Decoder::new().map_err(|_| ())?),
        };
        // A frame that failed before leaves the context mid-frame.
        decoder.reinit().map_err(|_| ())?;
        zstd_frame_with(decoder, input, out)
    })
}

fn zstd_frame_with(decoder: &mut Decoder<'static>, input: &[u8], out: &mut [u8]) -> Result<(), ()> {
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    loop {
        let (read, written) = (src.pos(), dst.pos());
        let hint = decoder.run(&mut src, &mut dst).map_err(|_| ())?;
        if hint == 0 {
            // The frame ended: it must have filled the cluster exactly.
            return if dst.pos() == dst.capacity() {
                Ok(())
            } else {
                Err(())
            };
        }
        if src.pos() == read && dst.pos() == written {
            // No progress: the input ended inside the frame, or the frame holds more than
            // a cluster.
            return Err(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 97 % 7) as u8).collect()
    }

    #[test]
    fn both_types_round_trip_through_sector_padding() {
        for kind in [Compression::Zlib, Compression::Zstd] {
            let data = cluster();
            let mut stored = kind.compress(&data).expect("compressible");
            assert!(stored.len() < data.len());
            // The sector padding a qcow2 compressed cluster is read with.
            stored.resize(stored.len().next_multiple_of(512) + 512, 0xa5);
            let mut out = vec![0u8; data.len()];
            assert_eq!(kind.decompress(&stored, &mut out), Ok(()), "{kind:?}");
            assert_eq!(out, data, "{kind:?}");
        }
    }

    #[test]
    fn incompressible_clusters_are_left_plain() {
        let mut state = 0x1234_5678u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        assert_eq!(Compression::Zlib.compress(&noise), None);
        assert_eq!(Compression::Zstd.compress(&noise), None);
    }

    #[test]
    fn zstd_frames_of_the_wrong_size_or_damaged_are_refused() {
        let data = cluster();
        let stored = Compression::Zstd.compress(&data).unwrap();
        let mut small = vec![0u8; data.len() / 2];
        assert_eq!(Compression::Zstd.decompress(&stored, &mut small), Err(()));
        let mut large = vec![0u8; data.len() * 2];
        assert_eq!(Compression::Zstd.decompress(&stored, &mut large), Err(()));
        let mut out = vec![0u8; data.len()];
        let truncated = &stored[..stored.len() / 2];
        assert_eq!(Compression::Zstd.decompress(truncated, &mut out), Err(()));
        assert_eq!(Compression::Zstd.decompress(&[0u8; 512], &mut out), Err(()));
    }
}
