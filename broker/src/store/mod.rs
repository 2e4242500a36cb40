//! What the broker keeps on disk and in the shared store: the registry of
//! bubble records (redb) and the encrypted frozen copies of suspended
//! bubbles (local directory or S3-compatible object store).

pub mod frozen;
pub mod meter;
pub mod registry;
