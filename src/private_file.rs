//! Files only their owner can read (0600): the generated encryption key and the first-run admin
//! API key. A leaf: it imports nothing of the crate, so services and start-up can both use it.

use std::{io::Write, path::Path};

/// Writes a file only its owner can read (0600), replacing any earlier content.
pub fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts.open(path)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut f = opts.open(path)?;
        f.write_all(contents)?;
        f.sync_all()
    }
}
