//! The region marks of a shadow (`<key>.regions` beside the data file, laid
//! out by [`crate::track::marks`]): which attached processes may store into
//! each 2 MiB region without a fault, and which process evicts there. A
//! sparse file of [`TABLE_BYTES`], mapped whole on first use by a process
//! that fills a lazy mapping in its fault handler, traps a lazy mapping's
//! regions or evicts; removed with the shadow.

use super::owned::{cstr, open_owned, Create};
use super::Shadow;
use crate::sys::{self, OwnedMap};
use crate::track::marks::{self, TABLE_BYTES};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

impl Shadow {
    fn regions_path(base: &str) -> String {
        format!("{base}.regions")
    }

    /// The address of this shadow's marks table, mapped on first use (None
    /// if it cannot be: then this process's lazy mappings count as
    /// untrapped and it does not evict).
    pub fn marks_table(&self) -> Option<usize> {
        let a = self.marks_addr.load(Ordering::Acquire);
        if a != 0 {
            return Some(a);
        }
        let mut m = self.marks.lock();
        if m.len() == 0 {
            self.note_files_made();
            let fd = open_owned(&Shadow::regions_path(&self.base), Create::Yes).ok()?;
            let fd = fd.as_raw_fd();
            if sys::file_size(fd).ok()? < TABLE_BYTES {
                sys::ftruncate(fd, TABLE_BYTES).ok()?;
            }
            *m = OwnedMap::shared(fd, TABLE_BYTES as usize, libc::PROT_READ | libc::PROT_WRITE)
                .ok()?;
        }
        self.marks_addr.store(m.addr(), Ordering::Release);
        Some(m.addr())
    }

    /// The marks table's address if this process mapped it.
    pub fn marks_table_if_mapped(&self) -> Option<usize> {
        Some(self.marks_addr.load(Ordering::Acquire)).filter(|&a| a != 0)
    }

    /// Detaching: this process's marks on the file's regions are cleared
    /// (it stores nowhere any more). A process that died leaves its marks
    /// until the shadow is removed: its slot's regions are not evicted by
    /// other processes meanwhile, which costs memory, never data.
    pub(super) fn clear_own_marks(&self, size: u64) {
        let a = self.marks_addr.load(Ordering::Acquire);
        if a != 0 {
            marks::clear_slot(a, marks::regions_of(0, size.max(1)), self.slot());
        }
    }

    pub(super) fn unlink_regions(base: &str) {
        let _ = sys::unlink(&cstr(&Shadow::regions_path(base)));
    }
}
