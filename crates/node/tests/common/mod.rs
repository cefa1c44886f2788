//! What the runtime's integration tests share.

use skiff_node::{ApplyError, Committed};

/// The number a test state machine's command carries (8 bytes,
/// little-endian); None for an entry without a command (a no-op or a
/// membership change).
pub fn command_u64(e: &Committed) -> Result<Option<u64>, ApplyError> {
    let Some(cmd) = &e.command else {
        return Ok(None);
    };
    let raw: [u8; 8] = cmd[..].try_into().map_err(|_| ApplyError {
        index: e.index,
        reason: format!("{} bytes, expected 8", cmd.len()),
    })?;
    Ok(Some(u64::from_le_bytes(raw)))
}
