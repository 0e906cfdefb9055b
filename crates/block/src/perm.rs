//! Node permissions: what each user of a node needs and what it lets others do. They are
//! the aio crate's, because their bit numbers also pick the image-file lock bytes.

pub use aio::Perms;
