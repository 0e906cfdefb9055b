//! Node permissions: what each user of a node needs and what it lets others do.
//!
//! The four permissions and their bit numbers are QEMU's, because the bit numbers also pick
//! the bytes of the image-file locks that QEMU processes look at.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Perms(u32);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    pub const WRITE: Perms = Perms(1 << 1);
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    pub const RESIZE: Perms = Perms(1 << 3);
    pub const ALL: Perms = Perms(0xf);

    const NAMES: [&'static str; 4] = ["consistent-read", "write", "write-unchanged", "resize"];

    pub const fn bits(self) -> u32 {
        self.0
    }

    pub const fn from_bits(bits: u32) -> Perms {
        Perms(bits & Self::ALL.0)
    }

    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersects(self, other: Perms) -> bool {
        self.0 & other.0 != 0
    }

    /// Names in QEMU's order of listing (highest bit first), as x-debug-query-block-graph shows.
    pub fn names(self) -> Vec<&'static str> {
        (0..Self::NAMES.len())
            .rev()
            .filter(|bit| self.0 & (1 << bit) != 0)
            .map(|bit| Self::NAMES[bit])
            .collect()
    }

    /// Names lowest bit first, joined as QEMU's permission-conflict message lists them.
    pub fn describe(self) -> String {
        (0..Self::NAMES.len())
            .filter(|bit| self.0 & (1 << bit) != 0)
            .map(|bit| Self::NAMES[bit])
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Perms {
    type Output = Perms;
    fn bitand(self, rhs: Perms) -> Perms {
        Perms(self.0 & rhs.0)
    }
}

impl std::ops::Not for Perms {
    type Output = Perms;
    fn not(self) -> Perms {
        Perms(!self.0 & Self::ALL.0)
    }
}

impl std::ops::BitOrAssign for Perms {
    fn bitor_assign(&mut self, rhs: Perms) {
        self.0 |= rhs.0;
    }
}

impl std::ops::BitAndAssign for Perms {
    fn bitand_assign(&mut self, rhs: Perms) {
        self.0 &= rhs.0;
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_qemu_order() {
        assert_eq!(
            Perms::ALL.names(),
            ["resize", "write-unchanged", "write", "consistent-read"]
        );
        assert_eq!((Perms::WRITE | Perms::RESIZE).describe(), "write, resize");
        assert_eq!(
            !Perms::WRITE,
            Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::RESIZE
        );
    }
}
