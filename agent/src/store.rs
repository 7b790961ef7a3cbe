//! The sled database shared by the journal, the processor snapshots and the outbox.
//! (Owned by the storage work: see the module contract below.)
//!
//! Contract used by other modules:
//! - `Store::open(&Config) -> Result<Store, StoreError>`: opens `agent.data_dir` with the
//!   configured cache, a `meta` tree holding the store epoch (random, created with the store);
//!   quarantines a corrupted store (rename to `<dir>.corrupt-<ts>`) and starts fresh.
//! - `Store` is `Clone` (sled handles are reference counted).
//! - `store.epoch() -> u64`, `store.db() -> &sled::Db`.
//! - `store.flush() -> Result<(), StoreError>`: blocking fsync of the whole database; call it
//!   from `spawn_blocking`, never `flush_async` (deadlocks in sled 0.34).
//! - `store.save_snapshot(position: u64, state: &[u8])`, `store.load_snapshot() ->
//!   Result<Option<(u64, Vec<u8>)>, StoreError>`.
