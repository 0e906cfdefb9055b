//! blockdev-create's `vhdx` driver (BlockdevCreateOptionsVhdx), laid out as QEMU lays a
//! new image out: the header section, the log at 1 MiB, the BAT after it, the metadata
//! after that, blocks from 4 MiB past the metadata.

use super::format::*;
use crate::drivers::file::os_error_text;
use crate::node::{Child, WriteFlags};
use serde::Deserialize;
use std::io;
use std::sync::Arc;

/// BlockdevVhdxSubformat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhdxSubformat {
    #[default]
    Dynamic,
    Fixed,
}

/// BlockdevCreateOptionsVhdx less its `file`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VhdxCreate {
    size: i64,
    log_size: Option<i64>,
    block_size: Option<i64>,
    #[serde(default)]
    subformat: VhdxSubformat,
    block_state_zero: Option<bool>,
}

/// QEMU's block size for a disk of `size` bytes.
fn default_block_size(size: u64) -> u64 {
    match size {
        s if s <= 1 << 30 => 8 * MIB,
        s if s <= 100 << 30 => 16 * MIB,
        s if s <= 32 << 40 => 32 * MIB,
        _ => 64 * MIB,
    }
}

fn io_text(e: io::Error) -> String {
    os_error_text(&e)
}

impl VhdxCreate {
    /// Write a new image onto the node `file` leads to (what was there is lost). Runs on
    /// an I/O thread.
    pub async fn create_on(&self, file: Arc<Child>) -> Result<(), String> {
        let size = u64::try_from(self.size).map_err(|_| "Invalid image size".to_string())?;
        if size > MAX_SIZE {
            return Err("Image size too large; max of 64TB".into());
        }
        let block_size = match self.block_size {
            None => default_block_size(size),
            Some(b) => {
                let b = u64::try_from(b).unwrap_or(0);
                if b == 0 || b % MIB != 0 {
                    return Err("Block size must be a multiple of 1 MB".into());
                }
                if !b.is_power_of_two() {
                    return Err("Block size must be a power of two".into());
                }
                if b > 256 * MIB {
                    return Err("Block size must not exceed 268435456".into());
                }
                b
            }
        };
        let log_size = u64::try_from(self.log_size.unwrap_or(MIB as i64)).unwrap_or(1);
        if log_size == 0 || log_size % MIB != 0 || log_size > u32::MAX as u64 {
            return Err("Log size must be a multiple of 1 MB".into());
        }
        let fixed = self.subformat == VhdxSubformat::Fixed;
        let meta = Metadata {
            block_size,
            leave_blocks_allocated: fixed,
            parent: None,
            disk_size: size,
            logical_sector: 512,
            physical_sector: 512,
        };
        let entries = meta.bat_entries();
        let log_offset = MIB;
        let bat_offset = log_offset + log_size;
        let bat_len = (entries * 8).next_multiple_of(MIB).max(MIB);
        let meta_offset = bat_offset + bat_len;
        let data_start = meta_offset + MIB + 4 * MIB;
        let zero_state = self.block_state_zero.unwrap_or(true);

        let mut random = [0u8; 56];
        crypto::random(&mut random)?;
        let seq = u64::from_le_bytes(random[48..56].try_into().expect("8 bytes")) >> 1;
        let mut id = vec![0u8; 64 * KIB as usize];
        id[..8].copy_from_slice(FILE_SIGNATURE);
        for (i, unit) in "blockd".encode_utf16().enumerate() {
            id[8 + i * 2..10 + i * 2].copy_from_slice(&unit.to_le_bytes());
        }
        let header = |sequence| Header {
            sequence,
            file_write_guid: random[..16].try_into().expect("16 bytes"),
            data_write_guid: random[16..32].try_into().expect("16 bytes"),
            log_guid: [0; 16],
            log_version: 0,
            log_length: log_size as u32,
            log_offset,
        };
        let mut regions = vec![0u8; REGION_TABLE_LEN];
        regions[..4].copy_from_slice(b"regi");
        regions[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (guid, offset, len)) in [
            (BAT_REGION, bat_offset, bat_len),
            (METADATA_REGION, meta_offset, MIB),
        ]
        .into_iter()
        .enumerate()
        {
            let e = &mut regions[16 + i * 32..48 + i * 32];
            e[..16].copy_from_slice(&guid);
            e[16..24].copy_from_slice(&offset.to_le_bytes());
            e[24..28].copy_from_slice(&(len as u32).to_le_bytes());
            e[28..32].copy_from_slice(&1u32.to_le_bytes());
        }
        seal(&mut regions, 4);

        let mut metadata = vec![0u8; (64 * KIB + 64) as usize];
        metadata[..8].copy_from_slice(b"metadata");
        metadata[10..12].copy_from_slice(&5u16.to_le_bytes());
        let items: [(Guid, Vec<u8>, u32); 5] = [
            (
                FILE_PARAMETERS,
                {
                    let mut p = (block_size as u32).to_le_bytes().to_vec();
                    p.extend_from_slice(&u32::from(fixed).to_le_bytes());
                    p
                },
                4,
            ),
            (VIRTUAL_DISK_SIZE, size.to_le_bytes().to_vec(), 6),
            (VIRTUAL_DISK_ID, random[32..48].to_vec(), 6),
            (LOGICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec(), 6),
            (PHYSICAL_SECTOR_SIZE, 512u32.to_le_bytes().to_vec(), 6),
        ];
        let mut at = 64 * KIB as usize;
        for (i, (guid, payload, flags)) in items.iter().enumerate() {
            let e = &mut metadata[32 + i * 32..64 + i * 32];
            e[..16].copy_from_slice(guid);
            e[16..20].copy_from_slice(&(at as u32).to_le_bytes());
            e[20..24].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            e[24..28].copy_from_slice(&flags.to_le_bytes());
            metadata[at..at + payload.len()].copy_from_slice(payload);
            at += payload.len();
        }

        let mut bat = vec![0u8; (entries * 8) as usize];
        for block in 0..meta.payload_blocks() {
            let entry = match (fixed, zero_state) {
                (true, false) => (data_start + block * block_size) | BLOCK_FULLY_PRESENT,
                (_, true) => BLOCK_ZERO,
                (false, false) => BLOCK_NOT_PRESENT,
            };
            let index = meta.bat_index(block);
            bat[index * 8..index * 8 + 8].copy_from_slice(&entry.to_le_bytes());
        }

        let file_size = if fixed {
            data_start + meta.payload_blocks() * block_size
        } else {
            data_start
        };
        let node = file.node();
        node.truncate(0).await.map_err(io_text)?;
        node.truncate(file_size).await.map_err(io_text)?;
        let plain = WriteFlags::default();
        for (offset, bytes) in [
            (0, id),
            (HEADER_OFFSETS[0], header(seq).to_bytes()),
            (HEADER_OFFSETS[1], header(seq + 1).to_bytes()),
            (REGION_TABLE_OFFSETS[0], regions.clone()),
            (REGION_TABLE_OFFSETS[1], regions),
            (bat_offset, bat),
            (meta_offset, metadata),
        ] {
            if !bytes.is_empty() {
                file.write(offset, &bytes, plain).await.map_err(io_text)?;
            }
        }
        file.flush().await.map_err(io_text)
    }
}
