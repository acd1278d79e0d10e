//! Output files that appear whole or not at all: written to a temporary file in the target's
//! directory, renamed into place on success; removed on error, on Ctrl-C and on SIGTERM. An
//! output that is one of the inputs (the same file, however named) is refused before any work.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use tempfile::NamedTempFile;

/// The temporary file being written, for the signal handler.
static PENDING: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Installs the Ctrl-C / SIGTERM handler: removes the pending temporary file and exits 130.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if let Some(path) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("error: interrupted; no output was written");
        std::process::exit(130);
    })
    .context("cannot install the interrupt handler")
}

/// Whether `a` and `b` are the same file (device and inode), when both exist.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A file being written atomically.
pub struct AtomicOutput {
    /// Present until `commit` takes it.
    temp: Option<NamedTempFile>,
    target: PathBuf,
}

impl AtomicOutput {
    /// Starts writing `target`; refuses a directory, a missing or unwritable directory, and any
    /// of `inputs` (an output never overwrites what is being read).
    pub fn create(target: &Path, inputs: &[&Path]) -> Result<AtomicOutput> {
        if target.is_dir() {
            bail!("--output {} is a directory; expected a file name", target.display());
        }
        if let Some(input) = inputs.iter().find(|i| same_file(target, i)) {
            bail!(
                "--output {} is the input file {}; write the output to another file",
                target.display(),
                input.display()
            );
        }
        let name = target.file_name().with_context(|| format!("--output {} does not name a file", target.display()))?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            bail!("the output directory {} does not exist", dir.display());
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(temp.path().to_path_buf());
        Ok(AtomicOutput { temp: Some(temp), target: target.to_path_buf() })
    }

    /// The file to write.
    pub fn file(&mut self) -> Result<&mut File> {
        self.temp.as_mut().map(NamedTempFile::as_file_mut).context("the output was already committed")
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        let mut temp = self.temp.take().context("the output was already committed")?;
        temp.as_file_mut()
            .flush()
            .and_then(|()| temp.as_file().sync_all())
            .with_context(|| format!("cannot write {}", target.display()))?;
        temp.persist(&target).with_context(|| format!("cannot rename the output into {}", target.display()))?;
        *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Some(dir) = target.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        // The temporary file itself is removed by `NamedTempFile`'s drop.
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(temp) = &self.temp
            && pending.as_deref() == Some(temp.path())
        {
            *pending = None;
        }
    }
}
