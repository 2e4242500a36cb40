//! Errors from the registry database.

/// Errors from the registry database.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The database could not be opened, read or written.
    #[error("registry database: {0}")]
    Db(String),
    /// A stored record could not be decoded.
    #[error("registry record for {id} is corrupt: {detail}")]
    Corrupt {
        /// The bubble id of the corrupt record.
        id: String,
        /// What was wrong.
        detail: String,
    },
}

impl RegistryError {
    /// Record `id` does not (de)serialize.
    pub(super) fn corrupt(id: &str, e: serde_json::Error) -> Self {
        RegistryError::Corrupt {
            id: id.to_string(),
            detail: e.to_string(),
        }
    }
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for RegistryError {
            fn from(e: $t) -> Self { RegistryError::Db(e.to_string()) }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
