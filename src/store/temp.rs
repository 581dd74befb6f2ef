//! Temp files for blobs being written: created in `<root>/tmp/`, removed on drop unless
//! committed, so a failed or abandoned fill never leaves a partial file behind.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A temp file that is deleted when dropped, unless [`TempFile::persist`] moved it.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Creates a new empty temp file for writing; its name is unique within the process
    /// and carries the pid so that leftovers of any process are recognisable.
    pub fn create(dir: &Path, hint: &str) -> io::Result<(TempFile, File)> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{hint}.{}.{n}.part", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((TempFile { path, armed: true }, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `dest` (same filesystem) and syncs the directory entry.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&self.path, dest)?;
        self.armed = false;
        if let Some(parent) = dest.parent() {
            // The rename is only durable once the directory is; ignore filesystems that
            // cannot fsync a directory.
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
