//! TODO: outbox
