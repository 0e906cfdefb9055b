//! Node permissions: what each user of a node needs and what it lets others do. They are
//! the aio crate's, because their bit numbers also pick the image-file lock bytes.

pub use aio::Perms;

/// What an image format takes on its children: on its storage (`file`, a vmdk extent, a
/// luks header), a consistent view that no one else writes under it, and write and resize
/// when the node is writable, whoever its users are (the format writes its metadata); on
/// `backing`, reads only, sharing everything. A backing file another node writes is then
/// refused, as QEMU refuses it ("Failed to get shared \"write\" lock").
pub fn format_child_perms(role: &str, perm: Perms, read_only: bool) -> (Perms, Perms) {
    match role {
        "backing" => (perm & Perms::CONSISTENT_READ, Perms::ALL),
        _ => {
            let write = if read_only {
                Perms::NONE
            } else {
                Perms::WRITE | Perms::RESIZE
            };
            (
                Perms::CONSISTENT_READ | write,
                Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED,
            )
        }
    }
}
